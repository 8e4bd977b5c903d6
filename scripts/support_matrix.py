"""The method x quantizer support matrix, generated from the code: each cell is what `validate` says when the
config `peft=<option> quant=<name>` is composed on the embedded tiny model (yes, or the reason it refuses).

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


def markdown(cells: dict[tuple[str, str], str | None]) -> str:
    peft_opts = sorted({p for p, _ in cells})
    quant_opts = sorted({q for _, q in cells})
    reasons: dict[str, int] = {}
    lines = ["| peft \\ quant | " + " | ".join(f"`{q}`" for q in quant_opts) + " |", "|---|" + "---|" * len(quant_opts)]
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


def readme_with(table: str, readme: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md lacks the markers {START} ... {END}")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv: list[str]) -> int:
    table = markdown(matrix(composer()))
    if "--write" in argv:
        path = ROOT / "README.md"
        path.write_text(readme_with(table, path.read_text()))
        print(f"wrote the support matrix into {path}")
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
