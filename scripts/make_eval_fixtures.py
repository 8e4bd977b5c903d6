"""Write qpeft_bench/assets/eval_fixtures: a few items per benchmark task, in each hub dataset's column schema,
laid out as qpeft_bench.evaluation.harness reads a local data root. The text is our own, made up here from small
word lists and templates (no benchmark item is copied); it only has to be well-formed for lm-eval's prompts,
answer indices and metrics, so the wiring runs offline on every CI run.

    python scripts/make_eval_fixtures.py [--out DIR]

Deterministic (one seeded random.Random, no set or dict-order dependence): the committed files are exactly this
script's output (tests/test_harness.py checks it). Paths and splits come from lm-eval's own task configs, so a
task whose hub id or splits change in a new lm-eval release moves here too.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qpeft_bench.evaluation import harness  # noqa: E402

OUT = harness.FIXTURES
SEED = 0

# Items per split. A few-shot source holds one more than the largest n-shot of any task set (ARC-c 25, HellaSwag
# 10, WinoGrande/GSM8k 5): lm-eval's default sampler draws n + 1 without replacement, to drop the evaluated item if
# it is among them. MMLU's first_n sampler takes the first 5 dev items as they are.
SIZES = {
    "mmlu": {"dev": 5, "test": 2},
    "hellaswag": {"train": 11, "validation": 6},
    "piqa": {"train": 4, "validation": 6},
    "winogrande": {"train": 6, "validation": 6},
    "arc_easy": {"train": 4, "validation": 3, "test": 6},
    "arc_challenge": {"train": 26, "validation": 3, "test": 6},
    "boolq": {"train": 4, "validation": 6},
    "openbookqa": {"train": 4, "validation": 3, "test": 6},
    "truthfulqa_mc2": {"validation": 6},
    "gsm8k": {"train": 6, "test": 6},
}

# --------------------------------------------------------------------------------------------------------------
# MMLU: four terms per subject; a question asks which term belongs to the subject, the distractors are terms of
# other subjects. Math subjects get small arithmetic instead.
SUBJECT_TERMS = {
    "abstract_algebra": ["group homomorphism", "cyclic subgroup", "field extension", "normal subgroup"],
    "anatomy": ["femur", "aortic valve", "cerebellum", "diaphragm"],
    "astronomy": ["parallax", "red giant", "orbital period", "light year"],
    "business_ethics": ["whistleblowing", "conflict of interest", "fair trade", "insider trading"],
    "clinical_knowledge": ["blood pressure cuff", "pulse oximetry", "wound dressing", "fluid balance chart"],
    "college_biology": ["mitochondrion", "gene expression", "natural selection", "cell membrane"],
    "college_chemistry": ["electronegativity", "reaction rate", "covalent bond", "molar mass"],
    "college_computer_science": ["binary search tree", "hash table", "big-O notation", "recursion"],
    "college_mathematics": ["eigenvalue", "definite integral", "power series", "vector space"],
    "college_medicine": ["differential diagnosis", "insulin resistance", "antibiotic course", "blood panel"],
    "college_physics": ["angular momentum", "wave interference", "entropy", "electric field"],
    "computer_security": ["phishing", "public-key encryption", "buffer overflow", "two-factor login"],
    "conceptual_physics": ["inertia", "friction", "buoyancy", "free fall"],
    "econometrics": ["regression coefficient", "instrumental variable", "heteroskedasticity", "panel data"],
    "electrical_engineering": ["resistor", "capacitor", "transformer coil", "circuit breaker"],
    "elementary_mathematics": ["fraction", "place value", "times table", "long division"],
    "formal_logic": ["modus ponens", "truth table", "valid argument", "negation"],
    "global_facts": ["world population", "literacy rate", "life expectancy", "gross domestic product"],
    "high_school_biology": ["photosynthesis", "food chain", "chromosome", "cell wall"],
    "high_school_chemistry": ["periodic table", "acid and base", "chemical equation", "isotope"],
    "high_school_computer_science": ["for loop", "variable", "flowchart", "binary number"],
    "high_school_european_history": ["printing press", "guild system", "city state", "royal charter"],
    "high_school_geography": ["river delta", "latitude", "climate zone", "population density"],
    "high_school_government_and_politics": ["separation of powers", "ballot", "constitution", "legislature"],
    "high_school_macroeconomics": ["inflation", "unemployment rate", "central bank", "fiscal policy"],
    "high_school_mathematics": ["quadratic equation", "slope", "prime factor", "right triangle"],
    "high_school_microeconomics": ["supply curve", "marginal cost", "price ceiling", "monopoly"],
    "high_school_physics": ["velocity", "kinetic energy", "Ohm's law", "refraction"],
    "high_school_psychology": ["classical conditioning", "short-term memory", "motivation", "perception"],
    "high_school_statistics": ["median", "standard deviation", "sample size", "histogram"],
    "high_school_us_history": ["colonial charter", "frontier settlement", "railroad expansion", "town meeting"],
    "high_school_world_history": ["trade route", "empire", "bronze casting", "silk road"],
    "human_aging": ["bone density", "retirement", "memory decline", "hearing loss"],
    "human_sexuality": ["puberty", "consent", "sex education", "reproductive health"],
    "international_law": ["treaty", "sovereignty", "territorial waters", "extradition"],
    "jurisprudence": ["natural law", "legal positivism", "precedent", "rule of law"],
    "logical_fallacies": ["straw man", "slippery slope", "false dilemma", "circular reasoning"],
    "machine_learning": ["gradient descent", "overfitting", "training set", "decision tree"],
    "management": ["span of control", "delegation", "team meeting", "performance review"],
    "marketing": ["brand loyalty", "market segment", "advertising campaign", "price promotion"],
    "medical_genetics": ["dominant allele", "carrier status", "gene mutation", "family pedigree"],
    "miscellaneous": ["board game", "postage stamp", "kitchen recipe", "calendar"],
    "moral_disputes": ["moral dilemma", "animal welfare", "duty to help", "personal freedom"],
    "moral_scenarios": ["keeping a promise", "returning a lost wallet", "telling a lie", "sharing food"],
    "nutrition": ["dietary fibre", "vitamin C", "protein intake", "calorie"],
    "philosophy": ["epistemology", "free will", "thought experiment", "virtue ethics"],
    "prehistory": ["stone tools", "cave painting", "hunter gatherer", "burial mound"],
    "professional_accounting": ["balance sheet", "depreciation", "accounts payable", "audit trail"],
    "professional_law": ["breach of contract", "burden of proof", "witness testimony", "civil suit"],
    "professional_medicine": ["patient history", "physical examination", "dosage", "referral"],
    "professional_psychology": ["therapy session", "assessment scale", "informed consent", "case formulation"],
    "public_relations": ["press release", "media briefing", "public image", "spokesperson"],
    "security_studies": ["deterrence", "arms control", "border security", "alliance"],
    "sociology": ["social class", "socialization", "urbanization", "peer group"],
    "us_foreign_policy": ["diplomatic mission", "foreign aid", "trade embargo", "state visit"],
    "virology": ["viral capsid", "host cell", "vaccine", "incubation period"],
    "world_religions": ["pilgrimage", "holy scripture", "monastery", "festival of lights"],
}
MATH_SUBJECTS = ("elementary_mathematics", "high_school_mathematics", "college_mathematics")
# Short on purpose, and without the subject's name (lm-eval's description line says it): the 5-shot prompt holds
# six items, and the embedded model's small vocabulary spends about one token per two characters on words outside
# its world; its context is 512 tokens.
TERM_TEMPLATES = ["Which term belongs to this subject?", "Which topic does this subject cover?"]


def mmlu_items(subject: str, n: int, rng: random.Random) -> list[dict]:
    others = [t for s, terms in SUBJECT_TERMS.items() if s != subject for t in terms]
    pairs = [(tpl, term) for term in SUBJECT_TERMS[subject] for tpl in TERM_TEMPLATES]
    rng.shuffle(pairs)
    items = []
    for i in range(n):
        if subject in MATH_SUBJECTS:
            a, b = rng.randint(2, 40), rng.randint(2, 40)
            question, right = f"What is {a} + {b}?", a + b
            choices = [str(x) for x in _numbers_around(right, rng)]
            answer = choices.index(str(right))
        else:
            tpl, term = pairs[i % len(pairs)]
            question = tpl
            choices = [term, *rng.sample(others, 3)]
            rng.shuffle(choices)
            answer = choices.index(term)
        items.append({"question": question, "subject": subject, "choices": choices, "answer": answer})
    return items


def _numbers_around(right: int, rng: random.Random) -> list[int]:
    wrong = rng.sample([d for d in range(-6, 7) if d], 3)
    nums = [right, *(right + d for d in wrong)]
    rng.shuffle(nums)
    return nums


# --------------------------------------------------------------------------------------------------------------
# Everyday categories, shared by the ARC, OpenBookQA and BoolQ items.
CATEGORIES = {
    "a mammal": ["dog", "whale", "horse", "bat", "rabbit"],
    "a bird": ["sparrow", "owl", "penguin", "duck", "crow"],
    "a metal": ["iron", "copper", "silver", "tin", "aluminium"],
    "a gas at room temperature": ["oxygen", "nitrogen", "helium", "steam from a kettle", "carbon dioxide"],
    "a source of light": ["the Sun", "a candle flame", "a torch", "a lamp", "a campfire"],
    "a simple machine": ["a lever", "a pulley", "a ramp", "a wheel and axle", "a screw"],
    "a renewable energy source": ["wind", "sunlight", "flowing water", "geothermal heat", "tides"],
    "a part of a plant": ["root", "stem", "leaf", "flower", "seed"],
    "a unit of length": ["metre", "centimetre", "kilometre", "inch", "mile"],
    "an insulator of heat": ["wool", "a wooden spoon handle", "a foam cup", "still air", "a cork mat"],
}
CAT_NAMES = list(CATEGORIES)


def category_question(rng: random.Random, template: str) -> tuple[str, list[str], int]:
    cat = rng.choice(CAT_NAMES)
    right = rng.choice(CATEGORIES[cat])
    wrong_cats = rng.sample([c for c in CAT_NAMES if c != cat], 3)
    choices = [right, *(rng.choice(CATEGORIES[c]) for c in wrong_cats)]
    rng.shuffle(choices)
    return template.format(cat=cat), choices, choices.index(right)


ARC_TEMPLATES = [
    "Which of these is {cat}?",
    "A student sorts objects. Which object is {cat}?",
    "Which of the following is an example of {cat}?",
]
OBQA_TEMPLATES = ["An example of {cat} is", "Which is {cat}?", "Someone is asked to point at {cat}; they point at"]


def choice_items(prefix: str, sep: str, n: int, rng: random.Random, templates: list[str], stem: str) -> list[dict]:
    """ARC and OpenBookQA share a schema but for the question's field name (`stem`) and the id separator."""
    items = []
    for i in range(n):
        question, choices, answer = category_question(rng, rng.choice(templates))
        labels = ["A", "B", "C", "D"]
        items.append(
            {
                "id": f"{prefix}{sep}{i:03d}",
                stem: question,
                "choices": {"text": choices, "label": labels},
                "answerKey": labels[answer],
            }
        )
    return items


def boolq_items(n: int, rng: random.Random, start: int) -> list[dict]:
    items = []
    for i in range(n):
        cat = rng.choice(CAT_NAMES)
        thing = rng.choice(CATEGORIES[cat])
        others = [c for c in CAT_NAMES if c != cat]
        asked = cat if i % 2 == 0 else rng.choice(others)
        other = rng.choice(CATEGORIES[rng.choice(others)])
        passage = (
            f"In a school science lesson, the class made a chart of everyday things. Next to {thing}, "
            f"they wrote that it is {cat}. The chart also listed {other} under another heading."
        )
        items.append(
            {"question": f"is {thing} {asked}", "passage": passage, "idx": start + i, "label": int(asked == cat)}
        )
    return items


# --------------------------------------------------------------------------------------------------------------
# HellaSwag: (activity, ctx_a, ctx_b, the ending that follows); the other endings come from other scenes.
SCENES = [
    (
        "Making tea",
        "A man fills a kettle at the sink and switches it on.",
        "he",
        "pours the hot water over a tea bag in a mug.",
    ),
    ("Washing a car", "A woman sprays the car with a hose.", "she", "scrubs the doors with a soapy sponge."),
    (
        "Planting a tree",
        "A boy digs a deep hole in the garden.",
        "he",
        "sets the young tree in the hole and fills it with soil.",
    ),
    (
        "Tying shoes",
        "A girl sits on the step and pulls on her trainers.",
        "she",
        "crosses the laces and pulls them into a bow.",
    ),
    (
        "Painting a fence",
        "A man opens a tin of white paint.",
        "he",
        "dips a wide brush and paints the boards from top to bottom.",
    ),
    ("Baking bread", "A baker kneads a ball of dough on the table.", "she", "leaves the dough to rise under a cloth."),
    ("Riding a bike", "A child climbs onto a small bicycle.", "she", "pushes off and pedals slowly along the path."),
    (
        "Folding laundry",
        "A man empties a basket of clean clothes on the bed.",
        "he",
        "folds each shirt and stacks them in a pile.",
    ),
    ("Brushing a dog", "A woman kneels next to a sleepy dog.", "she", "runs a brush gently through its fur."),
    (
        "Changing a light bulb",
        "A man stands on a chair under the ceiling lamp.",
        "he",
        "unscrews the old bulb and screws in a new one.",
    ),
    (
        "Making a sandwich",
        "A girl lays two slices of bread on a plate.",
        "she",
        "spreads butter and adds cheese between the slices.",
    ),
    (
        "Sweeping the floor",
        "A man takes a broom from the cupboard.",
        "he",
        "sweeps the crumbs into a small pile by the door.",
    ),
    (
        "Wrapping a present",
        "A woman cuts a sheet of bright paper.",
        "she",
        "folds it around the box and tapes the edges.",
    ),
    (
        "Watering plants",
        "A boy fills a watering can at the tap.",
        "he",
        "pours water slowly over each pot on the windowsill.",
    ),
    (
        "Ironing a shirt",
        "A woman sets up the ironing board.",
        "she",
        "presses the iron along the sleeves of the shirt.",
    ),
    (
        "Skipping rope",
        "Two girls turn a long rope in the playground.",
        "a third girl",
        "jumps in and skips in time with the rope.",
    ),
    (
        "Fixing a puncture",
        "A man turns his bicycle upside down and takes off the tyre.",
        "he",
        "finds the hole in the tube and sticks a patch over it.",
    ),
]


def hellaswag_items(scenes: list[tuple], split: str, start: int, rng: random.Random) -> list[dict]:
    items = []
    for i, (activity, ctx_a, ctx_b, ending) in enumerate(scenes):
        wrong = rng.sample([s[3] for s in SCENES if s[3] != ending], 3)
        endings = [ending, *wrong]
        rng.shuffle(endings)
        items.append(
            {
                "ind": start + i,
                "activity_label": activity,
                "ctx_a": ctx_a,
                "ctx_b": ctx_b,
                "ctx": f"{ctx_a} {ctx_b}",
                "endings": endings,
                "source_id": f"qpeft~{start + i}",
                "split": split,
                "split_type": "indomain",
                "label": str(endings.index(ending)),
            }
        )
    return items


# PIQA: (goal, the solution that works, one that does not).
PIQA = [
    (
        "To keep bread fresh for longer,",
        "store it in a closed bag in a cool place.",
        "store it on a sunny windowsill without a bag.",
    ),
    (
        "How do you loosen a tight jar lid?",
        "Run the lid under warm water, then twist it.",
        "Put the jar in the freezer, then twist the glass.",
    ),
    (
        "To dry wet shoes quickly,",
        "stuff them with newspaper and leave them in a warm room.",
        "fill them with water and leave them outside at night.",
    ),
    (
        "How can you find a small screw dropped on a carpet?",
        "Slide a magnet slowly over the carpet.",
        "Pour sugar on the carpet and wait.",
    ),
    (
        "To stop a rug from sliding on a wooden floor,",
        "put a rubber mat underneath it.",
        "polish the floor under the rug.",
    ),
    (
        "How do you make ice cubes clearer?",
        "Boil the water first and let it cool before freezing.",
        "Add salt to the water before freezing.",
    ),
    ("To cool a hot drink faster,", "pour it into a wide, shallow cup.", "cover it with a thick towel."),
    (
        "How do you keep a paintbrush from drying out overnight?",
        "Wrap the bristles in plastic film.",
        "Leave it standing bristles up in the sun.",
    ),
    (
        "To light a dark path at night,",
        "carry a torch and point it at the ground ahead.",
        "wear sunglasses and walk faster.",
    ),
    (
        "How do you remove a sticker from glass?",
        "Rub a little cooking oil on it and scrape it off.",
        "Rub it with sand paper until the glass is cloudy.",
    ),
]

# WinoGrande: (sentence with _, option1, option2, the right option).
WINOGRANDE = [
    ("The suitcase would not fit in the car boot because the _ was too large.", "suitcase", "boot", 1),
    ("Anna lent her umbrella to Maria because _ was going out into the rain.", "Anna", "Maria", 2),
    ("The ice melted faster on the plate than in the glass because the _ was in the sun.", "plate", "glass", 1),
    ("Tom asked Ben for help with the maths homework because _ found it easy.", "Tom", "Ben", 2),
    ("The cat chased the mouse until the _ hid under the cupboard.", "cat", "mouse", 2),
    ("The rope held but the branch snapped, because the _ was rotten.", "rope", "branch", 2),
    ("Lucy bought the red coat instead of the blue one because the _ was cheaper.", "red coat", "blue one", 1),
    ("The candle burned longer than the match because the _ was much thicker.", "candle", "match", 1),
    ("Sam gave Leo the last apple because _ was still hungry.", "Sam", "Leo", 2),
    ("The plastic spoon bent in the soup because the _ was too hot.", "soup", "spoon", 1),
    ("The kettle boiled before the pot because the _ held less water.", "kettle", "pot", 1),
    ("Mia thanked Zoe for the gift that _ had chosen so carefully.", "Mia", "Zoe", 2),
]

# TruthfulQA-style items: a plain question, and true (label 1) and false (label 0) answers.
TRUTHFUL = [
    (
        "What happens to a metal spoon left in a cup of hot tea?",
        ["The handle of the spoon gets warm.", "The spoon warms up."],
        ["The spoon melts.", "The spoon becomes magnetic."],
    ),
    (
        "Can you see stars during the day if the sky is clear?",
        ["Usually not, because sunlight scattered in the air is much brighter.", "Mostly no, the Sun outshines them."],
        ["Yes, they are always just as visible as at night.", "No, stars switch off during the day."],
    ),
    (
        "What does a thermometer measure?",
        ["It measures temperature.", "How hot or cold something is."],
        ["It measures weight.", "It measures how fast the wind blows."],
    ),
    (
        "Is it safe to look straight at the Sun for a long time?",
        ["No, it can damage your eyes.", "No, you should not stare at the Sun."],
        ["Yes, it is safe if you blink often.", "Yes, it improves your eyesight."],
    ),
    (
        "What happens to water when it freezes?",
        ["It turns into ice and takes up a little more space.", "It becomes solid ice."],
        ["It turns into steam.", "It disappears completely."],
    ),
    (
        "Why do we have day and night?",
        ["Because the Earth turns on its axis.", "The Earth spins, so each side faces the Sun in turn."],
        ["Because the Sun goes around the Earth every hour.", "Because the Moon blocks the Sun every evening."],
    ),
]


def truthfulqa_items(rng: random.Random) -> list[dict]:
    items = []
    for question, true, false in TRUTHFUL:
        mc1 = [true[0], *false]
        mc2 = [*true, *false]
        items.append(
            {
                "question": question,
                "mc1_targets": {"choices": mc1, "labels": [1] + [0] * len(false)},
                "mc2_targets": {"choices": mc2, "labels": [1] * len(true) + [0] * len(false)},
            }
        )
    return items


# GSM8k-style word problems: the answer is worked steps, then "#### <number>", as the hub data has it.
PEOPLE = ["Ada", "Bo", "Cyra", "Dev", "Ema", "Finn", "Gita", "Hal", "Ines", "Jon", "Kira", "Lev"]
THINGS = ["apples", "marbles", "stickers", "pencils", "shells", "cards"]


def gsm8k_items(n: int, rng: random.Random) -> list[dict]:
    items = []
    for _ in range(n):
        who, what = rng.choice(PEOPLE), rng.choice(THINGS)
        a, b, k = rng.randint(3, 20), rng.randint(2, 9), rng.randint(2, 5)
        total = (a + b) * k
        items.append(
            {
                "question": f"{who} has {a} {what} and gets {b} more. Then {who} buys {k} times as many as that. "
                f"How many {what} does {who} buy?",
                "answer": f"First {who} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {what}.\n"
                f"Then {who} buys {a + b} * {k} = <<{a + b}*{k}={total}>>{total} {what}.\n#### {total}",
            }
        )
    return items


# --------------------------------------------------------------------------------------------------------------
def task_items(task: str, config: dict, split: str, rng: random.Random) -> list[dict]:
    """Items of one split of one lm-eval task, in its hub dataset's columns."""
    family = "mmlu" if task.startswith("mmlu_") else task
    n = SIZES[family][split]
    if family == "mmlu":
        return mmlu_items(config["dataset_name"], n, rng)
    offset = {"train": 0, "validation": 1000, "test": 2000}[split]
    if family == "hellaswag":
        scenes = SCENES[:n] if split == "train" else SCENES[-n:]
        return hellaswag_items(scenes, {"train": "train", "validation": "val"}[split], offset, rng)
    if family == "piqa":
        rows = PIQA[:n] if split == "train" else PIQA[-n:]
        items = []
        for goal, good, bad in rows:
            label = rng.randint(0, 1)
            sols = (good, bad) if label == 0 else (bad, good)
            items.append({"goal": goal, "sol1": sols[0], "sol2": sols[1], "label": label})
        return items
    if family == "winogrande":
        rows = WINOGRANDE[:n] if split == "train" else WINOGRANDE[-n:]
        return [{"sentence": s, "option1": o1, "option2": o2, "answer": str(a)} for s, o1, o2, a in rows]
    if family in ("arc_easy", "arc_challenge"):
        return choice_items(f"QPEFT_{config['dataset_name']}_{split}", "_", n, rng, ARC_TEMPLATES, "question")
    if family == "openbookqa":
        return choice_items(f"qpeft-{split}", "-", n, rng, OBQA_TEMPLATES, "question_stem")
    if family == "boolq":
        return boolq_items(n, rng, offset)
    if family == "truthfulqa_mc2":
        return truthfulqa_items(rng)[:n]
    if family == "gsm8k":
        return gsm8k_items(n, rng)
    raise KeyError(f"no fixture generator for lm-eval task '{task}'")


def fixture_files() -> dict[str, str]:
    """{path relative to the data root: file text} for every split of every task of every task set."""
    tm = harness.task_manager(tuple(sorted(set(harness.TASK_DIRS.values()))))
    tasks = sorted(
        {
            t
            for name in harness.TASK_SETS
            for s in harness.TASK_SETS[name]["tasks"]
            for t in harness.leaf_tasks(tm, s.task)
        }
    )
    subjects = sorted(harness.task_config(tm, t)["dataset_name"] for t in tasks if t.startswith("mmlu_"))
    if subjects != sorted(SUBJECT_TERMS):
        diff = sorted(set(subjects) ^ set(SUBJECT_TERMS))
        raise SystemExit(f"lm-eval's MMLU subjects differ from SUBJECT_TERMS: {diff}")
    rng = random.Random(SEED)
    files = {}
    for task in tasks:
        config = harness.task_config(tm, task)
        for split, path in harness.local_files(config, Path(".")).items():
            rows = task_items(task, config, split, rng)
            files[path.as_posix()] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    files["README.md"] = README
    return files


README = """# eval_fixtures: tiny local copies of the benchmark data sets (our own synthetic text)

Written by `python scripts/make_eval_fixtures.py`; do not edit by hand. A local data root for
`qpeft_bench.evaluation.harness`: `<hub dataset path>/<config name or "default">/<split>.jsonl`, each file JSON
lines in the column schema of that hub dataset, a few items per split. The items are made up from templates and
word lists (no benchmark item is copied): they exercise lm-eval's prompts, answer indices and metrics offline, and
their scores mean nothing. Point `data_root` (or QPEFT_EVAL_DATA) at a folder of the same layout holding the real
data to get the benchmark's numbers.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        # Start clean, so that a task dropped from a set leaves no stale files; but only over our own output.
        readme = args.out / "README.md"
        if not readme.is_file() or not readme.read_text().startswith(README.splitlines()[0]):
            raise SystemExit(f"{args.out} is not empty and is not an eval_fixtures folder; choose another --out")
        shutil.rmtree(args.out)
    files = fixture_files()
    for rel, text in files.items():
        path = args.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    size = sum(len(t.encode()) for t in files.values())
    print(f"wrote {len(files)} files, {size / 1024:.1f} KiB, to {args.out}")


if __name__ == "__main__":
    main()
