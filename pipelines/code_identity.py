"""A stage's code identity: a hash of every project source it can run, found by following its imports.

Nothing here is a list someone keeps. Starting from the module that defines the stage function, every import
statement (at module level or inside a function; `if TYPE_CHECKING:` blocks excepted, they never run) that
names a module of this project is followed, transitively, with the `__init__` of every package on the way.
Next to the modules come the data files they read from their own package folder: a file of another kind
(YAML, JSON, a template) or a sub-folder that is not a package, such as `eval/tasks/` (lm-eval task files and
the Python they load by path, whose imports are followed too), counts for a module that names it in a path expression
(`Path(__file__).parent / "tasks"`, `open("x.yaml")`), which is how a module reads its own data.

Each Python file enters the hash as its syntax tree without docstrings, so a change to a comment, a docstring
or the layout changes nothing, while any change to what the code does changes the identity of exactly the
stages whose closure holds the file. Markdown (notes, READMEs) never counts. Imports by name at run time
(`importlib.import_module`) are not followed: the project has none, and a stage must not start using them.
"""
from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

# What a module may read from its package folder besides Python; anything else there (notes, images) is not code.
DATA_SUFFIXES = (".yaml", ".yml", ".json", ".jinja", ".txt", ".csv")


@functools.lru_cache(maxsize=64)
def project_packages(root: Path) -> frozenset[str]:
    """Top-level packages of the project under `root`: folders holding an `__init__.py` (read once per root)."""
    return frozenset(p.parent.name for p in root.glob("*/__init__.py"))


def _module_path(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: all of them but those under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return found


@functools.lru_cache(maxsize=4096)
def _parse(path: Path, mtime_ns: int, size: int) -> ast.Module:
    return ast.parse(path.read_bytes(), filename=str(path))


def parse(path: Path) -> ast.Module:
    """The file's syntax tree, parsed once per version of the file (callers must not modify it)."""
    st = path.stat()
    return _parse(path, st.st_mtime_ns, st.st_size)


def imported_modules(path: Path, module: str, root: Path) -> set[str]:
    """Project modules the file at `path` (module name `module`) imports, each with its parent packages."""
    st = path.stat()
    return set(_imported_modules(path, st.st_mtime_ns, st.st_size, module, root))


# Once per version of a file: every stage's identity walks mostly the same files, and walking their syntax trees
# again cost a third of a second per stage (13 stages per run).
@functools.lru_cache(maxsize=4096)
def _imported_modules(path: Path, mtime_ns: int, size: int, module: str, root: Path) -> frozenset[str]:
    packages = project_packages(root)
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in _import_nodes(parse(path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(parts + ([base] if base else []))
            # `from a.b import c`: c is a submodule when such a file exists, else a name defined in a.b.
            names = [base] + [f"{base}.{a.name}" for a in node.names if _module_path(root, f"{base}.{a.name}")]
        for name in names:
            parts = name.split(".")
            if not parts[0] in packages:
                continue
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
                if _module_path(root, ".".join(parts[:i])):
                    found.add(".".join(parts[:i]))
    return frozenset(found)


def module_closure(module: str, root: Path) -> list[Path]:
    """Every project file `module` can run or read (see the module docstring), sorted."""
    seen: dict[str, Path] = {}
    todo = [module]
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_path(root, name)
        if path is None:
            continue
        seen[name] = path
        files.add(path)
        todo.extend(imported_modules(path, name, root))
        for extra in _package_data(path, root):
            if extra not in files:
                files.add(extra)
                if extra.suffix == ".py":  # Python loaded by path (lm-eval task helpers): follow its imports
                    todo.extend(imported_modules(extra, extra.stem, root))
    return sorted(files)


_PATH_CALLS = {"Path", "PurePath", "open", "joinpath", "join"}


def _path_strings(path: Path) -> frozenset[str]:
    """String literals the module uses as paths: an operand of `/` (`Path(__file__).parent / "tasks"`) or an
    argument of Path(), open(), joinpath() or os.path.join(). A word in a dict key or a message ("tasks") is
    not a path, and must not pull a data folder into the identity."""
    st = path.stat()
    return _path_strings_of(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4096)
def _path_strings_of(path: Path, mtime_ns: int, size: int) -> frozenset[str]:
    out: set[str] = set()

    def add(node: ast.AST) -> None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.add(node.value)

    for n in ast.walk(parse(path)):
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div):
            add(n.left)
            add(n.right)
        elif isinstance(n, ast.Call):
            name = n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
            if name in _PATH_CALLS:
                for a in n.args:
                    add(a)
    return frozenset(out)


def _package_data(module_file: Path, root: Path) -> list[Path]:
    """Data files the module at `module_file` reads from its package folder: those of its folder's files of
    DATA_SUFFIXES, and those of its non-package sub-folders (all their data and Python files), that the
    module names in a path expression (`_path_strings`)."""
    folder = module_file.parent
    if folder == root or not (folder / "__init__.py").is_file() or module_file.suffix != ".py":
        return []
    named = _path_strings(module_file)
    out = [f for f in folder.iterdir() if f.is_file() and f.suffix in DATA_SUFFIXES and f.name in named]
    for sub in folder.iterdir():
        if sub.is_dir() and sub.name in named and not (sub / "__init__.py").is_file():
            out += [f for f in sub.rglob("*") if f.is_file() and "__pycache__" not in f.parts
                    and (f.suffix in DATA_SUFFIXES or f.suffix == ".py")]
    return out


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


@functools.lru_cache(maxsize=None)
def _file_digest(path: Path, mtime_ns: int, size: int) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".py":  # what the code does, not how it is written or commented
        data = ast.dump(_strip_docstrings(ast.parse(data, filename=str(path)))).encode()
    return hashlib.sha256(data).digest()


def code_identity(module: str, root: Path) -> str:
    """Hash of everything `module` can run or read in the project under `root` (16 hex digits)."""
    h = hashlib.sha256()
    for f in module_closure(module, root):
        st = f.stat()
        h.update(str(f.relative_to(root)).encode())
        h.update(_file_digest(f, st.st_mtime_ns, st.st_size))
    return h.hexdigest()[:16]
