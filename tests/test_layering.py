"""The layout's rules (README "Code layout"), checked on the source by an ast scan, so a change that
breaks one fails here instead of slowly turning the packages back into a circle:

1. A module imports only from its own layer or the layers below it.
2. The three stages (CLIP, prior, decoder) do not import each other.
3. Project imports sit at the top of the module, except the few in LOCAL_IMPORTS, each with its reason.
4. No source file is over 600 lines.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROJECT = ("clip", "dalle2", "data", "sample")

# Bottom to top. A module's layer is that of the longest prefix of its name listed here.
LAYERS = (
    ("core", ("dalle2.core",)),                                   # config, checkpoint, layers, trainer, I/O
    ("data and diffusion", ("data", "dalle2.diffusion")),          # the data sources; the diffusion process
    ("stages", ("clip", "clip.model", "dalle2.prior", "dalle2.prior.model", "dalle2.decoder")),
    ("unclip", ("dalle2", "dalle2.unclip", "dalle2.embeddings", "dalle2.pretrained")),
    ("instruments", ("dalle2.evaluation", "clip.evaluate", "dalle2.prior.evaluate")),
    ("entry points", ("clip.train", "dalle2.train_prior", "dalle2.train_decoder", "dalle2.pipeline",
                      "dalle2.export", "sample")),
)
STAGES = ("clip", "dalle2.prior", "dalle2.decoder")

# (importing module, imported module): why the import waits until it is needed.
LOCAL_IMPORTS = {
    ("dalle2", "dalle2.unclip"): "`import dalle2` stays light (PEP 562 __getattr__): DALLE2 loads on first use",
}


def modules() -> dict[str, Path]:
    found = {"sample": REPO / "sample.py"}
    for package in ("clip", "dalle2", "data"):
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict) -> list[tuple[str, int, bool]]:
    """(imported project module, line, at top level) for every import statement of the module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(node) for node in tree.body}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            # `from dalle2 import pretrained` imports the module dalle2.pretrained
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target.split(".")[0] in PROJECT:
                found.append((target, node.lineno, id(node) in top))
    return found


def layer(name: str) -> int:
    best = max((len(p), rank) for rank, (_, prefixes) in enumerate(LAYERS) for p in prefixes
               if name == p or name.startswith(p + "."))
    return best[1]


def stage(name: str):
    return next((s for s in STAGES if name == s or name.startswith(s + ".")), None)


KNOWN = modules()
EDGES = [(m, t, line, top) for m, p in KNOWN.items() for t, line, top in imports(m, p, KNOWN)]


def test_the_scan_sees_the_project():
    # the rules below mean something only if the scan finds the modules and their imports
    assert {"dalle2.core.config", "dalle2.unclip", "clip.model", "data.datasets", "sample"} <= set(KNOWN)
    assert ("dalle2.unclip", "dalle2.core.checkpoint") in {(m, t) for m, t, _, _ in EDGES}
    assert all(t in KNOWN for _, t, _, _ in EDGES), "an import names no module of the repo"
    assert layer("dalle2.core.training") == 0 and layer("dalle2.prior.evaluate") == 4 and layer("sample") == 5


def test_no_module_imports_from_a_layer_above_it():
    upward = [f"{m} ({LAYERS[layer(m)][0]}) imports {t} ({LAYERS[layer(t)][0]}), line {line}"
              for m, t, line, _ in EDGES if layer(t) > layer(m)]
    assert not upward, "\n".join(upward)


def test_the_stages_do_not_import_each_other():
    crossing = [f"{m} imports {t}, line {line}" for m, t, line, _ in EDGES
                if stage(m) and stage(t) and stage(m) != stage(t) and layer(m) == layer(t) == 2]
    assert not crossing, "\n".join(crossing)


def test_project_imports_are_at_the_top_of_the_module():
    local = [f"{m} imports {t} inside a function, line {line}" for m, t, line, top in EDGES
             if not top and (m, t) not in LOCAL_IMPORTS]
    assert not local, "\n".join(local)
    used = {(m, t) for m, t, _, top in EDGES if not top}
    assert set(LOCAL_IMPORTS) <= used, f"stale allow-list entries: {set(LOCAL_IMPORTS) - used}"


def test_no_source_file_is_over_600_lines():
    files = sorted(KNOWN.values()) + sorted((REPO / "tests").glob("*.py"))
    long = [f"{p.relative_to(REPO)}: {n} lines" for p in files if (n := len(p.read_text().splitlines())) > 600]
    assert not long, "\n".join(long)
