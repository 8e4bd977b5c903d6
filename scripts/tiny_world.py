"""Deterministic generator of a tiny synthetic world, as (a) plain encyclopedic text for pretraining and
(b) an Alpaca-style instruction data set about the same world.

Why a synthetic world: the embedded test model must be small enough to ship in the wheel yet *really*
pretrained, so that fine-tuning and quantization effects are measurable. A closed world with a few thousand
facts is learnable by a 4M-parameter model in minutes on a CPU, and the instruction set can then ask about
facts the model has seen only as prose, in a format (terse Q&A, small tasks) it has never seen.

The world itself is fixed (built from WORLD_SEED) so that every corpus seed describes the *same* facts;
the `seed` arguments only choose which sentences, stories and examples are sampled. Pure Python with no
set/dict-order dependence, so the output is identical across runs and machines. The lexicon is wider than
the facts strictly need (landmarks, weather, objects, ...) so that a 2048-token BPE vocabulary fills up.
"""

import random

WORLD_SEED = 20240601

TOWNS = [
    "Olden",
    "Brask",
    "Velmor",
    "Tarn",
    "Quillby",
    "Estry",
    "Harrowdale",
    "Pellin",
    "Zorra",
    "Mundle",
    "Carrow",
    "Fenwick",
]
RIVERS = ["Tal", "Senna", "Orla", "Wend", "Mirrow"]
REGIONS = ["the north", "the south", "the east", "the west", "the hills", "the coast"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
HAND_NAMES = [
    "Mira",
    "Tobin",
    "Asha",
    "Brannoc",
    "Celia",
    "Dorin",
    "Elska",
    "Fenn",
    "Galia",
    "Hobb",
    "Ilsa",
    "Joren",
    "Kesta",
    "Lomas",
    "Marra",
    "Nix",
    "Orrin",
    "Pella",
    "Quen",
    "Rusk",
    "Sable",
    "Tamsin",
    "Ulric",
    "Vessa",
    "Wren",
    "Yara",
    "Zeb",
    "Alder",
    "Bryn",
    "Corla",
    "Dace",
    "Emble",
    "Fira",
    "Gorr",
    "Hestia",
    "Ivo",
    "Jessa",
    "Kell",
    "Lark",
    "Maddox",
]
HAND_SURNAMES = [
    "Fallow",
    "Brindle",
    "Ashcombe",
    "Thorne",
    "Pike",
    "Marsh",
    "Oakes",
    "Whitlow",
    "Crane",
    "Dunmore",
    "Hollis",
    "Rook",
    "Pennick",
    "Sallow",
    "Trask",
    "Wick",
    "Barrow",
    "Cobb",
    "Dell",
    "Ember",
    "Finch",
    "Gale",
    "Heath",
    "Ivers",
    "Jory",
    "Kettle",
    "Lowe",
    "Moss",
    "Nettle",
    "Orme",
    "Pruitt",
    "Quarry",
    "Reed",
    "Stroud",
    "Tull",
    "Vane",
    "Wyke",
    "Yarrow",
    "Birch",
    "Colley",
]
# job: (workplace, tool, what the job does)
JOBS = {
    "baker": ("bakery", "oven", "bakes bread and cakes"),
    "fisher": ("boat", "net", "catches fish in the river"),
    "smith": ("forge", "hammer", "makes nails and horseshoes"),
    "farmer": ("farm", "plough", "grows wheat and beans"),
    "teacher": ("school", "chalk", "teaches children to read and write"),
    "potter": ("workshop", "wheel", "makes bowls and jugs from clay"),
    "weaver": ("workshop", "loom", "weaves wool into cloth"),
    "miller": ("mill", "millstone", "grinds grain into flour"),
    "carpenter": ("workshop", "saw", "builds tables and chairs"),
    "healer": ("infirmary", "herbs", "cares for people who are sick"),
    "sailor": ("ship", "rope", "sails along the coast"),
    "shepherd": ("pasture", "crook", "looks after a flock of sheep"),
    "painter": ("studio", "brush", "paints pictures of the river"),
    "tailor": ("shop", "needle", "sews coats and shirts"),
    "guard": ("gate", "spear", "watches the town gate at night"),
    "beekeeper": ("garden", "smoker", "keeps bees and collects honey"),
}
COLORS = ["red", "blue", "green", "yellow", "white", "black", "brown", "grey", "orange", "purple"]
FOODS = [
    "bread",
    "cheese",
    "apples",
    "plums",
    "honey",
    "fish soup",
    "porridge",
    "carrots",
    "pears",
    "beans",
    "nuts",
    "plum pie",
]
HOBBIES = [
    "singing",
    "fishing",
    "reading",
    "dancing",
    "climbing trees",
    "swimming",
    "telling riddles",
    "gardening",
    "knitting",
    "long walks",
    "drawing maps",
    "playing the flute",
]
TRAITS = [
    "kind",
    "quiet",
    "brave",
    "clever",
    "cheerful",
    "patient",
    "shy",
    "loud",
    "careful",
    "honest",
    "curious",
    "gentle",
    "stubborn",
    "generous",
    "proud",
    "lazy",
]
LANDMARKS = [
    "an old stone tower",
    "a wooden bridge",
    "a busy inn",
    "a small school",
    "a quiet temple",
    "a harbour",
    "a windmill",
    "an apple orchard",
    "a market square",
    "a library",
    "a deep well",
    "a clock tower",
    "a rose garden",
    "a ruined castle",
]
TREES = ["oak", "birch", "willow", "pine", "ash", "elm", "beech", "hazel", "maple", "cherry"]
WEATHER = ["sunny", "rainy", "windy", "foggy", "warm", "cloudy", "misty", "stormy"]
WINTER_WEATHER = ["snowy", "cold", "frosty", "foggy", "windy", "grey"]  # for December to February
GARMENTS = ["cloak", "apron", "hat", "scarf", "pair of boots", "tunic", "dress", "jacket", "waistcoat", "shawl"]
HOUSES = [
    "a thatched roof",
    "a blue door",
    "a small garden",
    "a tall chimney",
    "a round window",
    "ivy on the walls",
    "a crooked gate",
    "a red roof",
]
OBJECTS = [
    "basket",
    "lamp",
    "rope",
    "hammer",
    "needle",
    "bowl",
    "cup",
    "coat",
    "hat",
    "key",
    "map",
    "letter",
    "book",
    "box",
    "kettle",
    "blanket",
    "ladder",
    "bucket",
    "candle",
    "shovel",
    "scarf",
    "bell",
    "drum",
    "kite",
    "ring",
    "spoon",
    "jar",
    "sack",
    "whistle",
    "mirror",
]
OBJ_ADJ = ["old", "new", "small", "heavy", "shiny", "broken", "tiny", "painted", "wooden", "strange", "lovely", "dusty"]
# animal: (plural, legs, sound, home, size, diet, body)
ANIMALS = {
    "cat": ("cats", 4, "meows", "houses", "small", "mice", "soft fur"),
    "dog": ("dogs", 4, "barks", "houses", "small", "meat", "a long tail"),
    "goat": ("goats", 4, "bleats", "hills", "small", "grass", "two horns"),
    "horse": ("horses", 4, "neighs", "fields", "big", "hay", "a long mane"),
    "owl": ("owls", 2, "hoots", "woods", "small", "mice", "big eyes"),
    "fox": ("foxes", 4, "yelps", "woods", "small", "rabbits", "a bushy tail"),
    "rabbit": ("rabbits", 4, "squeaks", "fields", "small", "carrots", "long ears"),
    "duck": ("ducks", 2, "quacks", "ponds", "small", "seeds", "webbed feet"),
    "sheep": ("sheep", 4, "bleats", "hills", "big", "grass", "thick wool"),
    "cow": ("cows", 4, "moos", "fields", "big", "grass", "four stomachs"),
    "pig": ("pigs", 4, "grunts", "farms", "big", "turnips", "a curly tail"),
    "hen": ("hens", 2, "clucks", "farms", "small", "seeds", "a red comb"),
    "crow": ("crows", 2, "caws", "woods", "small", "worms", "black feathers"),
    "frog": ("frogs", 4, "croaks", "ponds", "small", "insects", "sticky feet"),
    "deer": ("deer", 4, "barks", "woods", "big", "leaves", "antlers"),
    "bear": ("bears", 4, "growls", "woods", "big", "berries", "sharp claws"),
    "wolf": ("wolves", 4, "howls", "woods", "big", "meat", "grey fur"),
    "mouse": ("mice", 4, "squeaks", "houses", "small", "cheese", "a thin tail"),
}
PETS = ["cat", "dog", "goat", "horse", "owl", "rabbit", "duck", "hen", "pig", "sheep"]
# singular/plural pairs for simple scene sentences (they feed the plural-rewriting task)
PLACES = {
    "river": "rivers",
    "mill": "mills",
    "house": "houses",
    "field": "fields",
    "market": "markets",
    "bridge": "bridges",
    "hill": "hills",
    "tree": "trees",
    "barn": "barns",
    "well": "wells",
}
VERBS = {
    "runs": "run",
    "sleeps": "sleep",
    "eats": "eat",
    "plays": "play",
    "rests": "rest",
    "walks": "walk",
    "sits": "sit",
    "waits": "wait",
}
# food: (where it comes from, the meal it is eaten at)
RECIPES = {
    "bread": ("is made from flour, water, salt and yeast", "breakfast"),
    "cheese": ("is made from milk and salt", "lunch"),
    "apples": ("grow on apple trees", "a snack"),
    "plums": ("grow on plum trees", "a snack"),
    "honey": ("is made by bees from the nectar of flowers", "breakfast"),
    "fish soup": ("is made from fish, onions, leeks and pepper", "supper"),
    "porridge": ("is made from oats, milk and a pinch of salt", "breakfast"),
    "carrots": ("grow under the soil", "supper"),
    "pears": ("grow on pear trees", "a snack"),
    "beans": ("grow in long green pods", "supper"),
    "nuts": ("grow on hazel and walnut trees", "a snack"),
    "plum pie": ("is made from plums, butter, flour and sugar", "supper"),
}
CREATURES = [
    "dragon",
    "giant",
    "witch",
    "troll",
    "ghost",
    "wizard",
    "knight",
    "fairy",
    "serpent",
    "griffin",
    "mermaid",
    "king",
    "queen",
    "bandit",
    "hermit",
]
DEEDS = [
    "guarded a golden treasure",
    "stole the moon for one night",
    "built the first bridge",
    "sang to the fish",
    "turned the river to silver",
    "slept for a hundred years under a hill",
    "taught the people to bake bread",
    "lost a magic ring in the well",
    "fought a storm with a wooden sword",
    "planted the first orchard",
    "carved a door into the mountain",
    "tamed a white horse made of cloud",
]
CUSTOMS = [
    "leave a candle by the window",
    "sing on the first day of spring",
    "never whistle after dark",
    "throw a small loaf into the river",
    "ring the bell at dawn",
    "wear a green ribbon in autumn",
    "tell the story to every child",
    "paint their doors blue",
    "dance around the old well",
]
NATURE = [
    "In spring, daisies and tulips bloom in the meadows.",
    "In summer, the days are long and warm.",
    "In autumn, the leaves turn gold and fall from the trees.",
    "In winter, snow covers the hills.",
    "The sun rises in the east and sets in the west.",
    "The sky is blue on a clear day.",
    "Grass is green and snow is white.",
    "Clouds bring rain, and rain fills the rivers.",
    "The moon shines at night.",
    "Stars are bright when the night is dark.",
    "Moss grows on the north side of stones.",
    "Ferns and nettles grow in the shade of the woods.",
    "Heather and thistles cover the high moors.",
    "Lilies float on the quiet ponds.",
    "Wild roses grow along the hedges.",
    "Clover is sweet, and bees love it.",
    "Mushrooms appear in the woods after rain.",
    "Ice covers the ponds in the coldest weeks.",
    "Thunder follows lightning during a storm.",
    "A rainbow appears when the sun shines through rain.",
    "Every river flows down to the sea.",
    "Frost makes the grass sparkle in the morning.",
    "Fog rises from the rivers on cold mornings.",
    "Blackberries ripen at the end of summer.",
    "Swallows fly south before winter.",
    "The wind is strongest on the coast.",
    "Rocks and pebbles line the river banks.",
    "A week has seven days, and a year has twelve months.",
    "Wheat turns yellow before the harvest.",
    "Barley and oats grow in the fields near the rivers.",
    "Squirrels hide acorns for the winter.",
    "Beavers build dams across small streams.",
    "Salmon swim upstream to lay their eggs.",
    "Hedgehogs sleep through the winter.",
    "Butterflies visit the flowers in July.",
    "December, January and February are the winter months.",
    "June, July and August are the summer months.",
    "Spiders spin webs between the branches.",
    "Woodpeckers knock on the bark of trees.",
]
NUM_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def in_words(n):
    """English words for 0 <= n < 200."""
    if n >= 100:
        return "one hundred" + ("" if n == 100 else " and " + in_words(n - 100))
    if n < 20:
        return NUM_WORDS[n]
    return TENS[n // 10] + ("" if n % 10 == 0 else "-" + NUM_WORDS[n % 10])


# Many people, so that the model holds a few thousand facts it has seen only tens of times each. With 40
# people every fact was memorized with a huge margin and NF4 quantization changed nothing measurable.
N_PEOPLE = 400


def _generate_names(rng, n, suffixes, taken):
    """Pronounceable made-up words: onset + vowel + middle + vowel/suffix."""
    onsets = [
        "B",
        "C",
        "D",
        "F",
        "G",
        "H",
        "J",
        "K",
        "L",
        "M",
        "N",
        "P",
        "R",
        "S",
        "T",
        "V",
        "W",
        "Y",
        "Z",
        "Br",
        "Dr",
        "Gr",
        "Tr",
        "Th",
        "St",
        "Fl",
        "Kr",
        "Sh",
    ]
    vowels = ["a", "e", "i", "o", "u", "ae", "ea", "y"]
    mids = ["l", "r", "n", "m", "s", "d", "v", "th", "nd", "rr", "ll", "sk"]
    out, seen = [], set(taken)
    while len(out) < n:
        w = rng.choice(onsets) + rng.choice(vowels) + rng.choice(mids) + rng.choice(suffixes)
        if w not in seen and not any(a == b == c for a, b, c in zip(w, w[1:], w[2:], strict=False)):  # no "Nallley"
            seen.add(w)
            out.append(w)
    return out


_name_rng = random.Random(WORLD_SEED + 1)
NAMES = HAND_NAMES + _generate_names(
    _name_rng,
    N_PEOPLE - len(HAND_NAMES),
    ["a", "o", "in", "en", "is", "ar", "ic", "ia", "on", "el"],
    HAND_NAMES + TOWNS,
)
SURNAMES = HAND_SURNAMES + _generate_names(
    _name_rng,
    N_PEOPLE - len(HAND_SURNAMES),
    ["ley", "wick", "ford", "ton", "by", "well", "more", "field", "brook", "worth", "cott", "hill", "ridge"],
    HAND_SURNAMES + NAMES + TOWNS,
)


def _build_world():
    rng = random.Random(WORLD_SEED)
    towns = {}
    for t in TOWNS:
        towns[t] = dict(
            river=rng.choice(RIVERS),
            region=rng.choice(REGIONS),
            size=rng.choice(["village", "town"]),
            pop=rng.randrange(200, 5000, 10),
            day=rng.choice(DAYS),
            product=rng.choice(FOODS),
            landmarks=rng.sample(LANDMARKS, 2),
            tree=rng.choice(TREES),
            month=rng.choice(MONTHS),
            inn=f"The {rng.choice(COLORS).capitalize()} {rng.choice(sorted(ANIMALS)).capitalize()}",
            legend=(rng.choice(CREATURES), rng.choice(DEEDS), rng.choice(CUSTOMS)),
        )
    people = {}
    for n, s in zip(NAMES, SURNAMES, strict=True):
        people[n] = dict(
            surname=s,
            town=rng.choice(TOWNS),
            job=rng.choice(sorted(JOBS)),
            color=rng.choice(COLORS),
            food=rng.choice(FOODS),
            pet=rng.choice(PETS),
            age=rng.randint(18, 79),
            hobby=rng.choice(HOBBIES),
            trait=rng.choice(TRAITS),
            pron=rng.choice(["he", "she"]),
            garment=rng.choice(GARMENTS),
            house=rng.choice(HOUSES),
        )
    order = NAMES[:]
    rng.shuffle(order)
    for a, b in zip(order[0::2], order[1::2], strict=True):  # friendship is symmetric: pair people up
        people[a]["friend"], people[b]["friend"] = b, a
    return towns, people


TOWN_FACTS, PEOPLE = _build_world()


def art(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def cap(s):
    return s[0].upper() + s[1:]


def pick(rng, seq):
    return rng.choice(sorted(seq))


# ---------------------------------------------------------------------------------------------- corpus
def person_doc(rng, n):
    p = PEOPLE[n]
    he, his = cap(p["pron"]), ("His" if p["pron"] == "he" else "Her")
    first = rng.choice(
        [
            f"{n} lives in {p['town']}.",
            f"{n} {p['surname']} lives in {p['town']}.",
            f"{n} is from {p['town']}.",
            f"{n} has a home in {p['town']}.",
        ]
    )
    facts = [
        rng.choice(
            [
                f"{n} is {art(p['job'])}.",
                f"{n} works as {art(p['job'])}.",
                f"By trade, {n} is {art(p['job'])}.",
                f"{he} works as {art(p['job'])} and {JOBS[p['job']][2]}.",
            ]
        ),
        rng.choice(
            [
                f"{n}'s favourite colour is {p['color']}.",
                f"{n} likes the colour {p['color']}.",
                f"{his} favourite colour is {p['color']}.",
            ]
        ),
        rng.choice(
            [
                f"{n} likes to eat {p['food']}.",
                f"The food {n} likes best is {p['food']}.",
                f"{he} likes to eat {p['food']}.",
            ]
        ),
        rng.choice([f"{n} keeps {art(p['pet'])}.", f"{n} has a pet {p['pet']}.", f"{he} has a pet {p['pet']}."]),
        rng.choice([f"{n} is {p['age']} years old.", f"{he} is {p['age']} years old."]),
        rng.choice(
            [
                f"{n} is a friend of {p['friend']}.",
                f"{n} and {p['friend']} are friends.",
                f"{his} best friend is {p['friend']}.",
            ]
        ),
        rng.choice([f"{n} enjoys {p['hobby']}.", f"In {his.lower()} free time, {n} enjoys {p['hobby']}."]),
        rng.choice([f"People say that {n} is very {p['trait']}.", f"{n} is {p['trait']}."]),
        rng.choice([f"{his} family name is {p['surname']}.", f"{n}'s family name is {p['surname']}."]),
        f"The river {TOWN_FACTS[p['town']]['river']} flows past {p['town']}, where {n} lives.",
        rng.choice(
            [f"{n} usually wears a {p['color']} {p['garment']}.", f"{he} often wears a {p['color']} {p['garment']}."]
        ),
        f"{n}'s house has {p['house']}.",
    ]
    rng.shuffle(facts)
    return " ".join([first] + facts[: rng.randint(3, len(facts))])


def town_doc(rng, t):
    f = TOWN_FACTS[t]
    people = [n for n in NAMES if PEOPLE[n]["town"] == t]
    lm = f["landmarks"]
    facts = [
        rng.choice([f"The river {f['river']} flows past {t}.", f"{t} lies on the river {f['river']}."]),
        f"{t} is known for its {f['product']}.",
        rng.choice([f"About {f['pop']} people live in {t}.", f"{t} has about {f['pop']} people."]),
        f"The market in {t} is held on {f['day']}.",
        f"In {t} there is {lm[0]} and {lm[1]}.",
        f"Many {f['tree']} trees grow around {t}.",
        f"Every {f['month']}, {t} holds a festival with music and {f['product']}.",
        f"The inn of {t} is called {f['inn']}.",
    ]
    if people:
        people = rng.sample(people, min(len(people), rng.randint(2, 4)))
        who = people[0] if len(people) == 1 else ", ".join(people[:-1]) + " and " + people[-1]
        facts.append(f"People who live in {t} include {who}.")
    rng.shuffle(facts)
    return " ".join([f"{t} is {art(f['size'])} in {f['region']}."] + facts[: rng.randint(2, len(facts))])


def animal_doc(rng, a):
    pl, legs, sound, home, size, diet, body = ANIMALS[a]
    facts = [
        f"The {a} has {NUM_WORDS[legs]} legs.",
        f"{cap(art(a))} {sound}.",
        f"Many {pl} live in the {home}.",
        f"{cap(art(a))} is a {size} animal.",
        f"Many {pl} are {rng.choice(COLORS)}.",
        f"{cap(art(a))} eats {diet}.",
        f"{cap(art(a))} has {body}.",
    ]
    keepers = [n for n in NAMES if PEOPLE[n]["pet"] == a]
    if keepers:
        facts.append(f"{rng.choice(keepers)} has a pet {a}.")
    rng.shuffle(facts)
    return " ".join([f"The {a} is an animal."] + facts[: rng.randint(2, len(facts))])


def job_doc(rng, j):
    place, tool, does = JOBS[j]
    who = [n for n in NAMES if PEOPLE[n]["job"] == j]
    facts = [f"{cap(art(j))} works in {art(place)}.", f"{cap(art(j))} uses {art(tool)}.", f"{cap(art(j))} {does}."]
    if who:
        w = rng.choice(who)
        facts.append(f"{w} is {art(j)} in {PEOPLE[w]['town']}.")
    rng.shuffle(facts)
    return " ".join(facts)


def legend_doc(rng, t):
    creature, deed, custom = TOWN_FACTS[t]["legend"]
    opening = rng.choice([f"Long ago, {art(creature)} lived near {t}.", f"The people of {t} tell an old story."])
    closing = rng.choice(
        ["Nobody knows if it is true.", "Children love this story.", "Old people still believe it.", ""]
    )
    return " ".join(
        [opening, f"The legend says that {art(creature)} {deed}.", f"Since then, the people of {t} {custom}.", closing]
    ).strip()


def food_doc(rng, food):
    origin, meal = RECIPES[food]
    fans = [n for n in NAMES if PEOPLE[n]["food"] == food]
    towns = [t for t in TOWNS if TOWN_FACTS[t]["product"] == food]
    facts = [f"{cap(food)} {origin}.", f"Many people eat {food} for {meal}."]
    if fans:
        facts.append(f"{rng.choice(fans)} likes {food} more than any other food.")
    if towns:
        facts.append(f"{rng.choice(towns)} is known for its {food}.")
    rng.shuffle(facts)
    return " ".join(facts)


def nature_doc(rng):
    return " ".join(rng.sample(NATURE, rng.randint(2, 5)))


def scene(rng, plural=None):
    a, place, verb = pick(rng, ANIMALS), pick(rng, PLACES), pick(rng, VERBS)
    prep = rng.choice(["near", "by", "under", "behind"])
    if plural is None:
        plural = rng.random() < 0.5
    if plural:
        return f"The {ANIMALS[a][0]} {VERBS[verb]} {prep} the {PLACES[place]}."
    return f"The {a} {verb} {prep} the {place}."


def story_doc(rng):
    n = rng.choice(NAMES)
    p, f = PEOPLE[n], PEOPLE[n]["friend"]
    q = PEOPLE[f]
    he, him, his = p["pron"], ("him" if p["pron"] == "he" else "her"), ("his" if p["pron"] == "he" else "her")
    obj = f"{rng.choice(OBJ_ADJ)} {rng.choice(OBJECTS)}"
    month = rng.choice(MONTHS)
    weather = rng.choice(WINTER_WEATHER if month in ("December", "January", "February") else WEATHER)
    s = [
        rng.choice(
            [
                f"It was a {weather} {rng.choice(DAYS)} in {month}.",
                f"One {weather} morning in {month}, {n} woke up early.",
            ]
        ),
        f"{n} the {p['job']} left {p['town']}.",
    ]
    if q["town"] != p["town"]:
        s.append(f"{cap(he)} walked along the river {TOWN_FACTS[p['town']]['river']} to visit {f} in {q['town']}.")
    else:
        s.append(f"{cap(he)} went to see {f}, who also lives in {p['town']}.")
    extras = [
        scene(rng),
        f"{cap(he)} took {his} {p['pet']} along.",
        f"{cap(he)} carried {art(obj)} in a basket.",
        f"{f} is {art(q['job'])}, and {q['pron']} was busy at the {JOBS[q['job']][0]}.",
        f"They shared some {rng.choice([p['food'], q['food']])} and talked for a long time.",
        f"{f} showed {him} something {q['color']}.",
        f"They sat under an old {rng.choice(TREES)} tree.",
        f"On the way, {he} saw {art(pick(rng, ANIMALS))}.",
        f"{f} gave {him} {art(obj)} as a gift.",
        f"At the market, {he} bought {art(obj)} and a bag of {rng.choice(FOODS)}.",
        f"{cap(he)} lost {his} {rng.choice(OBJECTS)}, but {f} found it.",
        scene(rng),
        f"They spent the afternoon {q['hobby'] if q['hobby'].endswith('ing') else 'together'}.",
        f"{cap(he)} wrote a letter to {f}.",
        f"{cap(he)} fed the {ANIMALS[q['pet']][0]} of {f}.",
        f"{cap(he)} crossed {rng.choice(['a wooden', 'a stone', 'an old'])} bridge.",
        f"{cap(he)} picked blackberries near a hedge.",
        f"The children waved at {him} and laughed.",
        f"{f} told {him} the legend of {art(TOWN_FACTS[q['town']]['legend'][0])}.",
        f"{cap(he)} borrowed a {rng.choice(OBJECTS)} and promised to return it.",
        f"{cap(he)} climbed a hill and counted {rng.randint(3, 12)} {ANIMALS[pick(rng, ANIMALS)][0]} below.",
    ]
    rng.shuffle(extras)
    s += extras[: rng.randint(2, 6)]
    s.append(
        rng.choice(
            [
                f"In the evening, {n} went back home to {p['town']}.",
                f"{n} was happy that day.",
                f"At night, {n} slept well.",
                f"It was a good day for {n} and {f}.",
            ]
        )
    )
    return " ".join(s)


def arithmetic_doc(rng):
    out = []
    for _ in range(rng.randint(3, 8)):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        kind = rng.random()
        if kind < 0.45:
            out.append(f"{a} plus {b} is {a + b}.")
        elif kind < 0.8:
            out.append(f"{max(a, b)} minus {min(a, b)} is {max(a, b) - min(a, b)}.")
        elif kind < 0.9:
            a, b = rng.randint(1, 12), rng.randint(1, 12)
            out.append(f"{a} times {b} is {a * b}.")
        elif kind < 0.95:
            out.append(f"After {a} comes {a + 1}.")
        else:
            out.append(f"{a + b} is written as {in_words(a + b)}.")
    return " ".join(out)


def corpus(seed, n_docs):
    """Return n_docs short documents (one paragraph each, no newlines inside)."""
    rng = random.Random(seed)
    makers = [
        (0.28, lambda: person_doc(rng, rng.choice(NAMES))),
        (0.09, lambda: town_doc(rng, rng.choice(TOWNS))),
        (0.07, lambda: animal_doc(rng, pick(rng, ANIMALS))),
        (0.04, lambda: job_doc(rng, pick(rng, JOBS))),
        (0.03, lambda: legend_doc(rng, rng.choice(TOWNS))),
        (0.03, lambda: food_doc(rng, rng.choice(FOODS))),
        (0.03, lambda: nature_doc(rng)),
        (0.20, lambda: story_doc(rng)),
        (0.15, lambda: arithmetic_doc(rng)),
        (0.08, lambda: " ".join(scene(rng) for _ in range(rng.randint(2, 5)))),
    ]
    return [_weighted(rng, makers)() for _ in range(n_docs)]


def _weighted(rng, items):
    r, acc = rng.random(), 0.0
    for w, x in items:
        acc += w
        if r < acc:
            return x
    return items[-1][1]


# ---------------------------------------------------------------------------------------------- instructions
def _fact_question(rng):
    n, t, a, j = rng.choice(NAMES), rng.choice(TOWNS), pick(rng, ANIMALS), pick(rng, JOBS)
    p = PEOPLE[n]
    return rng.choice(
        [
            (rng.choice([f"Which town does {n} live in?", f"Where does {n} live?"]), "", p["town"]),
            ("Name the town where this person lives.", n, p["town"]),
            (rng.choice([f"Name the job of {n}.", f"What does {n} do for a living?"]), "", p["job"]),
            ("What is this person's job?", n, p["job"]),
            (f"What is {n}'s favourite colour?", "", p["color"]),
            (f"What food does {n} like best?", "", p["food"]),
            (f"What pet does {n} have?", "", p["pet"]),
            (f"How old is {n}?", "", str(p["age"])),
            (f"Who is {n}'s best friend?", "", p["friend"]),
            (f"What is the family name of {n}?", "", p["surname"]),
            (f"What does {n} enjoy?", "", p["hobby"]),
            (f"Which river flows past {t}?", "", TOWN_FACTS[t]["river"]),
            ("Name the river that flows past this town.", t, TOWN_FACTS[t]["river"]),
            (f"On which day is the market in {t}?", "", TOWN_FACTS[t]["day"]),
            (f"What is {t} known for?", "", TOWN_FACTS[t]["product"]),
            (f"What is the inn of {t} called?", "", TOWN_FACTS[t]["inn"]),
            (f"How many legs does a {a} have?", "", str(ANIMALS[a][1])),
            (f"What does a {a} eat?", "", ANIMALS[a][5]),
            (f"Where does a {j} work?", "", f"in {art(JOBS[j][0])}"),
            (f"What tool does a {j} use?", "", art(JOBS[j][1])),
        ]
    )


def _classify(rng):
    x = rng.choice(TOWNS + sorted(ANIMALS) + NAMES + sorted(JOBS))
    kind = {
        **{k: "a place" for k in TOWNS},
        **{k: "an animal" for k in ANIMALS},
        **{k: "a person" for k in NAMES},
        **{k: "a job" for k in JOBS},
    }[x]
    if x in NAMES or x in JOBS or rng.random() < 0.5:
        return (f'Is "{x}" a person, a job, an animal, or a place?', "", kind)
    return (f"Classify: is {x} an animal or a place?", "", kind)


def _plural(rng):
    a, place, verb = pick(rng, ANIMALS), pick(rng, PLACES), pick(rng, VERBS)
    prep = rng.choice(["near", "by", "under", "behind"])
    return (
        "Rewrite the sentence in the plural.",
        f"The {a} {verb} {prep} the {place}.",
        f"The {ANIMALS[a][0]} {VERBS[verb]} {prep} the {PLACES[place]}.",
    )


def _arith(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    hi, lo = max(a, b), min(a, b)
    return rng.choice(
        [
            (f"What is {a} plus {b}?", "", str(a + b)),
            ("Add the two numbers.", f"{a} and {b}", str(a + b)),
            (f"What is {hi} minus {lo}?", "", str(hi - lo)),
            ("Subtract the second number from the first.", f"{hi}, {lo}", str(hi - lo)),
            ("Which number is larger?", f"{a}, {b}", str(hi)),
        ]
    )


def _list_task(rng):
    # Frequent corpus words only: rarer ones (trees, objects) split into many tokens and overflow 160 tokens.
    pool = sorted(ANIMALS) + COLORS + TOWNS + sorted(JOBS) + [f for f in FOODS if " " not in f]
    words = rng.sample(pool, rng.randint(3, 5))  # 6 words would push a few examples past 160 tokens
    if rng.random() < 0.5:
        return ("Reverse the order of these words.", ", ".join(words), ", ".join(words[::-1]))
    return ("Sort these words in alphabetical order.", ", ".join(words), ", ".join(sorted(words, key=str.lower)))


def _count(rng):
    s = rng.choice([person_doc(rng, rng.choice(NAMES)), story_doc(rng)]).split(". ")[1].rstrip(".") + "."
    return ("How many words are in this sentence?", s, str(len(s.split())))


TASKS = [(0.26, _arith), (0.16, _list_task), (0.08, _count), (0.30, _fact_question), (0.08, _classify), (0.12, _plural)]


def alpaca(seed, n):
    """Return n Stanford-Alpaca records {instruction, input, output}, unique on (instruction, input)."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        ins, inp, outp = _weighted(rng, TASKS)(rng)
        if (ins, inp) not in seen:  # fact questions saturate; the open-ended tasks keep the set growing
            seen.add((ins, inp))
            out.append({"instruction": ins, "input": inp, "output": outp})
    return out
