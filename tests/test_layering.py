"""Dependencies point one way (docs/DESIGN.md, "Layers"): utils/ <- model/ <- evaluation/ <- scripts.

Every import of every module is read with ast, including imports inside functions, so a lower layer
never reaches a higher one, not even lazily.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The packages from the bottom up, and what each may import of the project.
LAYERS = {"utils": {"utils"}, "model": {"utils", "model"}, "evaluation": {"utils", "model", "evaluation"}}


def project_modules(root):
    """Top-level names of the project: its packages and the scripts beside them (train, linear, bench, ...)."""
    names = set()
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if entry.endswith(".py"):
            names.add(entry[:-3])
        elif os.path.isdir(path) and not entry.startswith(".") and any(
                name.endswith(".py") for name in os.listdir(path)):
            names.add(entry)
    return names


def imported_tops(path):
    """(line, top-level module name) of every import in the file at ``path``."""
    with open(path, encoding="utf-8") as file:
        tree = ast.parse(file.read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside its own package
                continue
            yield node.lineno, node.module.split(".")[0]


def layering_violations(root):
    """Lines ``file:line imports X`` where a layer of LAYERS imports a project module above it."""
    project = project_modules(root)
    found = []
    for package, allowed in LAYERS.items():
        folder = os.path.join(root, package)
        for dirpath, _, files in os.walk(folder):
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                for line, top in imported_tops(path):
                    if top in project and top not in allowed:
                        above = "a script" if top not in LAYERS else f"{top}/"
                        found.append(f"{os.path.relpath(path, root)}:{line} imports {top} ({above}); "
                                     f"{package}/ may import only {', '.join(sorted(allowed))}")
    return found


def test_lower_layers_never_import_higher_ones():
    assert layering_violations(ROOT) == []


def test_an_upward_import_inside_a_function_is_found(tmp_path):
    for package in ("utils", "model", "evaluation"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "linear.py").write_text("")
    (tmp_path / "utils" / "runtime.py").write_text("import os\nfrom utils import errors\n\n\ndef f():\n"
                                                   "    from model.unet import UNet\n    import linear\n")
    (tmp_path / "model" / "net.py").write_text("from utils.errors import UserError\nimport evaluation.cells\n")
    (tmp_path / "evaluation" / "probe.py").write_text("from model import net\nfrom .cells import x\nimport linear\n")
    assert layering_violations(str(tmp_path)) == [
        "utils/runtime.py:6 imports model (model/); utils/ may import only utils",
        "utils/runtime.py:7 imports linear (a script); utils/ may import only utils",
        "model/net.py:2 imports evaluation (evaluation/); model/ may import only model, utils",
        "evaluation/probe.py:3 imports linear (a script); evaluation/ may import only evaluation, model, utils",
    ]
