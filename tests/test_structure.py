"""The house rules of the layout: scripts are thin and import library modules only; storage knows no
method; the yardstick does not reach the method it measures."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"train_teacher", "train_refiner", "sample", "evaluate", "ablate", "analyze", "bench",
           "make_assignment", "study"}
METHOD = {"noiserefine", "pairs", "teacher"}


def local_imports(module):
    """The repository modules that `module` imports directly."""
    tree = ast.parse(open(os.path.join(ROOT, f"{module}.py")).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if os.path.isfile(os.path.join(ROOT, f"{n}.py"))}


def reachable(module):
    seen, todo = set(), [module]
    while todo:
        for m in local_imports(todo.pop()) - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_no_script_imports_another_script():
    for script in SCRIPTS:
        assert not local_imports(script) & SCRIPTS, f"{script}.py imports a script"
    libraries = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")} - SCRIPTS
    for module in libraries:
        assert not local_imports(module) & SCRIPTS, f"the library {module}.py imports a script"


def test_storage_knows_no_method_and_the_yardstick_does_not_reach_it():
    assert not reachable("checkpoint") & METHOD
    assert not reachable("metrics") & METHOD
    assert not reachable("diffusion") - {"diffusion"}  # the paper's math stands alone
