"""The demo pair's English-German lexicon: every word that tools/demo_data.py's grammar can put into a sentence.

Each table is one line per entry, fields separated by `|`, so that a reader can check a German form at a glance.
"""

# English singular | plural | German singular | plural | gender (m, f, n) | kinds the grammar picks it for
NOUNS = """
man|men|Mann|Männer|m|person
woman|women|Frau|Frauen|f|person
child|children|Kind|Kinder|n|person
teacher|teachers|Lehrer|Lehrer|m|person
doctor|doctors|Arzt|Ärzte|m|person
friend|friends|Freund|Freunde|m|person
girl|girls|Mädchen|Mädchen|n|person
brother|brothers|Bruder|Brüder|m|person
sister|sisters|Schwester|Schwestern|f|person
father|fathers|Vater|Väter|m|person
mother|mothers|Mutter|Mütter|f|person
pupil|pupils|Schüler|Schüler|m|person
cook|cooks|Koch|Köche|m|person
king|kings|König|Könige|m|person
queen|queens|Königin|Königinnen|f|person
baker|bakers|Bäcker|Bäcker|m|person
singer|singers|Sänger|Sänger|m|person
driver|drivers|Fahrer|Fahrer|m|person
grandmother|grandmothers|Großmutter|Großmütter|f|person
uncle|uncles|Onkel|Onkel|m|person
aunt|aunts|Tante|Tanten|f|person
son|sons|Sohn|Söhne|m|person
daughter|daughters|Tochter|Töchter|f|person
guest|guests|Gast|Gäste|m|person
waiter|waiters|Kellner|Kellner|m|person
painter|painters|Maler|Maler|m|person
dog|dogs|Hund|Hunde|m|animal
cat|cats|Katze|Katzen|f|animal
horse|horses|Pferd|Pferde|n|animal
bird|birds|Vogel|Vögel|m|animal
mouse|mice|Maus|Mäuse|f|animal
cow|cows|Kuh|Kühe|f|animal
pig|pigs|Schwein|Schweine|n|animal
sheep|sheep|Schaf|Schafe|n|animal
duck|ducks|Ente|Enten|f|animal
wolf|wolves|Wolf|Wölfe|m|animal
fox|foxes|Fuchs|Füchse|m|animal
rabbit|rabbits|Kaninchen|Kaninchen|n|animal
frog|frogs|Frosch|Frösche|m|animal
ball|balls|Ball|Bälle|m|thing
table|tables|Tisch|Tische|m|thing surface
chair|chairs|Stuhl|Stühle|m|thing surface
bed|beds|Bett|Betten|n|thing surface
lamp|lamps|Lampe|Lampen|f|thing
key|keys|Schlüssel|Schlüssel|m|thing
cup|cups|Tasse|Tassen|f|thing
bag|bags|Tasche|Taschen|f|thing container
box|boxes|Kiste|Kisten|f|thing container
picture|pictures|Bild|Bilder|n|thing art
clock|clocks|Uhr|Uhren|f|thing
phone|phones|Telefon|Telefone|n|thing
computer|computers|Computer|Computer|m|thing
hat|hats|Hut|Hüte|m|thing
shoe|shoes|Schuh|Schuhe|m|thing
coat|coats|Mantel|Mäntel|m|thing
window|windows|Fenster|Fenster|n|thing opening landmark
door|doors|Tür|Türen|f|thing opening landmark
flower|flowers|Blume|Blumen|f|thing
tree|trees|Baum|Bäume|m|landmark
pen|pens|Stift|Stifte|m|thing
glass|glasses|Glas|Gläser|n|thing
plate|plates|Teller|Teller|m|thing
bottle|bottles|Flasche|Flaschen|f|thing container
gift|gifts|Geschenk|Geschenke|n|thing
ring|rings|Ring|Ringe|m|thing
guitar|guitars|Gitarre|Gitarren|f|thing
umbrella|umbrellas|Schirm|Schirme|m|thing
apple|apples|Apfel|Äpfel|m|food
bread|breads|Brot|Brote|n|food
cake|cakes|Kuchen|Kuchen|m|food
soup|soups|Suppe|Suppen|f|food
egg|eggs|Ei|Eier|n|food
banana|bananas|Banane|Bananen|f|food
cheese|cheeses|Käse|Käse|m|food
sausage|sausages|Wurst|Würste|f|food
pear|pears|Birne|Birnen|f|food
potato|potatoes|Kartoffel|Kartoffeln|f|food
tomato|tomatoes|Tomate|Tomaten|f|food
coffee|coffees|Kaffee|Kaffees|m|drink
tea|teas|Tee|Tees|m|drink
juice|juices|Saft|Säfte|m|drink
milk|milks|Milch|Milch|f|drink
water|waters|Wasser|Wasser|n|drink
beer|beers|Bier|Biere|n|drink
wine|wines|Wein|Weine|m|drink
book|books|Buch|Bücher|n|text container
letter|letters|Brief|Briefe|m|text container
newspaper|newspapers|Zeitung|Zeitungen|f|text
story|stories|Geschichte|Geschichten|f|text tale
song|songs|Lied|Lieder|n|text tale
poem|poems|Gedicht|Gedichte|n|text tale
map|maps|Karte|Karten|f|text
magazine|magazines|Zeitschrift|Zeitschriften|f|text
house|houses|Haus|Häuser|n|place building landmark
garden|gardens|Garten|Gärten|m|place
city|cities|Stadt|Städte|f|place
school|schools|Schule|Schulen|f|place building landmark
park|parks|Park|Parks|m|place
kitchen|kitchens|Küche|Küchen|f|place room
room|rooms|Zimmer|Zimmer|n|place room
street|streets|Straße|Straßen|f|place
station|stations|Bahnhof|Bahnhöfe|m|place building landmark
church|churches|Kirche|Kirchen|f|place building landmark
forest|forests|Wald|Wälder|m|place
village|villages|Dorf|Dörfer|n|place
museum|museums|Museum|Museen|n|place building
hotel|hotels|Hotel|Hotels|n|place building landmark
shop|shops|Laden|Läden|m|place building
office|offices|Büro|Büros|n|place building room
library|libraries|Bibliothek|Bibliotheken|f|place building
castle|castles|Schloss|Schlösser|n|place building landmark
restaurant|restaurants|Restaurant|Restaurants|n|place building
hospital|hospitals|Krankenhaus|Krankenhäuser|n|place building
lake|lakes|See|Seen|m|place
bridge|bridges|Brücke|Brücken|f|landmark surface
tower|towers|Turm|Türme|m|building landmark
car|cars|Auto|Autos|n|vehicle
bus|buses|Bus|Busse|m|vehicle
train|trains|Zug|Züge|m|vehicle
bike|bikes|Fahrrad|Fahrräder|n|vehicle
boat|boats|Boot|Boote|n|vehicle
ship|ships|Schiff|Schiffe|n|vehicle
plane|planes|Flugzeug|Flugzeuge|n|vehicle
"""

# English | German stem (predicative and before endings)
ADJECTIVES = """
big|groß
small|klein
old|alt
new|neu
beautiful|schön
good|gut
bad|schlecht
red|rot
blue|blau
green|grün
white|weiß
black|schwarz
yellow|gelb
fast|schnell
slow|langsam
loud|laut
quiet|ruhig
warm|warm
cold|kalt
young|jung
long|lang
short|kurz
cheap|billig
wonderful|wunderbar
friendly|freundlich
tired|müde
happy|glücklich
sad|traurig
bright|hell
strong|stark
weak|schwach
rich|reich
poor|arm
important|wichtig
simple|einfach
heavy|schwer
light|leicht
clean|sauber
dirty|schmutzig
fresh|frisch
clever|klug
nice|nett
interesting|interessant
funny|lustig
thin|dünn
wild|wild
modern|modern
famous|berühmt
hungry|hungrig
empty|leer
full|voll
"""

# English base | 3rd singular | past | participle | German infinitive | du | er | participle | auxiliary |
# subject kinds | object kinds (acc, or dat: ...; empty: none) | flags (motion: takes `to`/`from`)
# The ich/wir/sie forms follow from the infinitive.
VERBS = """
sleep|sleeps|slept|slept|schlafen|schläfst|schläft|geschlafen|haben|person animal||
laugh|laughs|laughed|laughed|lachen|lachst|lacht|gelacht|haben|person||
work|works|worked|worked|arbeiten|arbeitest|arbeitet|gearbeitet|haben|person||
swim|swims|swam|swum|schwimmen|schwimmst|schwimmt|geschwommen|sein|person animal||
dance|dances|danced|danced|tanzen|tanzt|tanzt|getanzt|haben|person||
wait|waits|waited|waited|warten|wartest|wartet|gewartet|haben|person animal||
cry|cries|cried|cried|weinen|weinst|weint|geweint|haben|person||
live|lives|lived|lived|wohnen|wohnst|wohnt|gewohnt|haben|person||
play|plays|played|played|spielen|spielst|spielt|gespielt|haben|person animal||
go|goes|went|gone|gehen|gehst|geht|gegangen|sein|person animal||motion
come|comes|came|come|kommen|kommst|kommt|gekommen|sein|person animal||motion
run|runs|ran|run|laufen|läufst|läuft|gelaufen|sein|person animal||motion
drive|drives|drove|driven|fahren|fährst|fährt|gefahren|sein|person||motion
travel|travels|travelled|travelled|reisen|reist|reist|gereist|sein|person||motion
fly|flies|flew|flown|fliegen|fliegst|fliegt|geflogen|sein|person animal||motion
stay|stays|stayed|stayed|bleiben|bleibst|bleibt|geblieben|sein|person animal||
sing|sings|sang|sung|singen|singst|singt|gesungen|haben|person|tale|
see|sees|saw|seen|sehen|siehst|sieht|gesehen|haben|person animal|person animal thing food vehicle building|
read|reads|read|read|lesen|liest|liest|gelesen|haben|person|text|
eat|eats|ate|eaten|essen|isst|isst|gegessen|haben|person animal|food|
drink|drinks|drank|drunk|trinken|trinkst|trinkt|getrunken|haben|person animal|drink|
buy|buys|bought|bought|kaufen|kaufst|kauft|gekauft|haben|person|thing food drink text vehicle|
look for|looks for|looked for|looked for|suchen|suchst|sucht|gesucht|haben|person animal|person animal thing|
find|finds|found|found|finden|findest|findet|gefunden|haben|person animal|person animal thing text|
love|loves|loved|loved|lieben|liebst|liebt|geliebt|haben|person|person animal food drink place|
cook|cooks|cooked|cooked|kochen|kochst|kocht|gekocht|haben|person|food|
build|builds|built|built|bauen|baust|baut|gebaut|haben|person|building surface|
paint|paints|painted|painted|malen|malst|malt|gemalt|haben|person|person animal art building|
visit|visits|visited|visited|besuchen|besuchst|besucht|besucht|haben|person|person place|
sell|sells|sold|sold|verkaufen|verkaufst|verkauft|verkauft|haben|person|thing food vehicle text|
open|opens|opened|opened|öffnen|öffnest|öffnet|geöffnet|haben|person|opening container|
close|closes|closed|closed|schließen|schließt|schließt|geschlossen|haben|person|opening container|
need|needs|needed|needed|brauchen|brauchst|braucht|gebraucht|haben|person animal|thing food drink vehicle|
have|has|had|had|haben|hast|hat|gehabt|haben|person|person animal thing vehicle|
write|writes|wrote|written|schreiben|schreibst|schreibt|geschrieben|haben|person|tale text|
take|takes|took|taken|nehmen|nimmst|nimmt|genommen|haben|person|thing food drink|
carry|carries|carried|carried|tragen|trägst|trägt|getragen|haben|person animal|thing food|
hear|hears|heard|heard|hören|hörst|hört|gehört|haben|person animal|person animal tale|
know|knows|knew|known|kennen|kennst|kennt|gekannt|haben|person animal|person animal place tale|
bring|brings|brought|brought|bringen|bringst|bringt|gebracht|haben|person animal|thing food drink|
wash|washes|washed|washed|waschen|wäschst|wäscht|gewaschen|haben|person|person animal thing vehicle|
lose|loses|lost|lost|verlieren|verlierst|verliert|verloren|haben|person animal|thing|
forget|forgets|forgot|forgotten|vergessen|vergisst|vergisst|vergessen|haben|person animal|person thing tale|
catch|catches|caught|caught|fangen|fängst|fängt|gefangen|haben|person animal|animal|
help|helps|helped|helped|helfen|hilfst|hilft|geholfen|haben|person animal|dat: person animal|
thank|thanks|thanked|thanked|danken|dankst|dankt|gedankt|haben|person|dat: person|
follow|follows|followed|followed|folgen|folgst|folgt|gefolgt|sein|person animal|dat: person animal|
give|gives|gave|given|geben|gibst|gibt|gegeben|haben|person|dat: person animal; thing food drink text|
show|shows|showed|shown|zeigen|zeigst|zeigt|gezeigt|haben|person|dat: person; thing art text vehicle|
"""

# Verbs that take a `that` clause: English base | 3rd singular | German ich | du | er | wir/sie
SAYING_VERBS = """
say|says|sage|sagst|sagt|sagen
know|knows|weiß|weißt|weiß|wissen
think|thinks|denke|denkst|denkt|denken
believe|believes|glaube|glaubst|glaubt|glauben
hope|hopes|hoffe|hoffst|hofft|hoffen
"""

# English | German | tenses it goes with (present, past, perfect, future) | where: `time` may stand first,
# `often` (frequency) comes before an English simple present verb
ADVERBS = """
today|heute|present past future|time
yesterday|gestern|past|time
tomorrow|morgen|future|time
now|jetzt|present|time
later|später|future|time
often|oft|present|often
always|immer|present|often
sometimes|manchmal|present|often
rarely|selten|present|often
usually|meistens|present|often
"""

# English | German | case | noun kinds | what it goes with (place: a location; with: company; for: a beneficiary;
# to: the goal of a motion verb)
PREPOSITIONS = """
in|in|dat|place|place
on|auf|dat|surface|place
under|unter|dat|surface|place
behind|hinter|dat|landmark|place
next to|neben|dat|landmark|place
with|mit|dat|person animal|with
without|ohne|acc|person animal|with
for|für|acc|person animal|for
to|zu|dat|place person|to
from|von|dat|place person|to
"""

NAMES = (
    "Anna Peter Maria Thomas Lisa Paul Emma Max Sophie Lukas Lena Felix Julia Jonas Laura David Sarah Tim Nina Jan "
    "Clara Leon Mia Ben Eva Tom Lea Noah Hannah Elias Tobias Sabine Klaus Monika Stefan Petra Martin Karin Frank Ida"
).split()


def table(text):
    """The entries of one table above: lists of fields."""
    return [line.split("|") for line in text.strip().splitlines()]
