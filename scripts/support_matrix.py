"""The method x quantizer support matrix, generated from the code: each cell is what `validate` says when the
config `peft=<option> quant=<name>` is composed on the embedded tiny model (yes, or the reason it refuses); and the
quantizer x model family matrix: `quant=<name>` with LoRA composed on a small checkpoint of each family
(families.TINY_ARCH, model=auto) that has only its config.json.

    python scripts/support_matrix.py            # print the Markdown table
    python scripts/support_matrix.py --write    # replace the table in README.md between its markers

Methods with a `group_size` knob (QA-LoRA) must match the quantizer's group size; their cells are composed with
`peft.group_size` set to the quantizer's, so a cell says whether the *pairing* works. tests/test_support_matrix.py
fails when README.md's table is stale, and checks that every "yes" cell trains.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"
FAMILY_START, FAMILY_END = "<!-- family-matrix:start -->", "<!-- family-matrix:end -->"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


def cell_overrides(peft_option: str, quant_option: str, compose) -> list[str]:
    overrides = [f"peft={peft_option}", f"quant={quant_option}"]
    cfg = compose(overrides)
    if "group_size" in cfg["peft"] and "group_size" in cfg["quant"]:
        overrides.append(f"peft.group_size={cfg['quant']['group_size']}")
    return overrides


def matrix(compose) -> dict[tuple[str, str], str | None]:
    """{(peft option, quant option): None if it runs, else the reason}."""
    from qpeft_bench.config import ConfigError
    from qpeft_bench.spec import validate

    cells = {}
    for p in options("peft"):
        for q in options("quant"):
            try:
                validate(compose(cell_overrides(p, q, compose)))
                cells[p, q] = None
            except ConfigError as err:
                cells[p, q] = str(err).split(": ", 1)[-1] if "cannot run on" in str(err) else str(err)
    return cells


def family_checkpoints(root: Path) -> dict[str, str]:
    """{model_type: a directory holding a config.json of the family's small architecture} under `root`."""
    import json

    from qpeft_bench import families

    out = {}
    for model_type in families.names():
        where = root / f"tiny-{model_type}"
        where.mkdir(parents=True, exist_ok=True)
        (where / "config.json").write_text(json.dumps({"model_type": model_type, **families.TINY_ARCH}))
        out[model_type] = str(where)
    return out


def family_matrix(compose, checkpoints: dict[str, str]) -> dict[tuple[str, str], str | None]:
    """{(quant option, model_type): None if LoRA on it composes, else the reason}."""
    from qpeft_bench.config import ConfigError
    from qpeft_bench.spec import validate

    cells = {}
    for q in options("quant"):
        for model_type, path in checkpoints.items():
            try:
                validate(compose([f"quant={q}", "peft=lora", "model=auto", f"model.path={path}"]))
                cells[q, model_type] = None
            except ConfigError as err:  # one footnote per quantizer, not per family
                cells[q, model_type] = str(err).split("; this model is ")[0]
    return cells


def markdown(cells: dict[tuple[str, str], str | None], corner: str = "peft \\ quant") -> str:
    peft_opts = sorted({p for p, _ in cells})
    quant_opts = sorted({q for _, q in cells})
    reasons: dict[str, int] = {}
    lines = [f"| {corner} | " + " | ".join(f"`{q}`" for q in quant_opts) + " |", "|---|" + "---|" * len(quant_opts)]
    for p in peft_opts:
        row = []
        for q in quant_opts:
            why = cells[p, q]
            if why is None:
                row.append("yes")
            else:
                n = reasons.setdefault(why, len(reasons) + 1)
                row.append(f"no ({n})")
        lines.append(f"| `{p}` | " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"{n}. {why}" for why, n in reasons.items()]
    return "\n".join(lines)


def composer():
    from hydra import compose, initialize_config_dir

    from qpeft_bench.cli import CONF_DIR, job_config

    def _compose(overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return job_config(compose(config_name="run", overrides=list(overrides)))

    return _compose


def readme_with(table: str, readme: str, start: str = START, end: str = END) -> str:
    if start not in readme or end not in readme:
        raise SystemExit(f"README.md lacks the markers {start} ... {end}")
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{table}\n{end}{tail}"


def family_markdown(compose) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        return markdown(family_matrix(compose, family_checkpoints(Path(root))), "quant \\ family")


def main(argv: list[str]) -> int:
    compose = composer()
    table, families = markdown(matrix(compose)), family_markdown(compose)
    if "--write" in argv:
        path = ROOT / "README.md"
        text = readme_with(table, path.read_text())
        path.write_text(readme_with(families, text, FAMILY_START, FAMILY_END))
        print(f"wrote the support matrices into {path}")
    else:
        print(table, families, sep="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
