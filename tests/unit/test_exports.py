"""The public surface named by aegis_stream/__init__.py (trio's test_exports idea)."""

import ast
import subprocess
import sys
from pathlib import Path

import aegis_stream


def test_every_public_name_resolves_to_its_defining_object():
    for name in aegis_stream.__all__:
        obj = getattr(aegis_stream, name)
        assert obj is not None, name
        if name != "__version__":
            # a public class or function, defined where the facade says
            mod = aegis_stream._EXPORTS[name]
            assert obj.__module__.startswith(mod.rsplit(".", 1)[0]), (name, obj.__module__)


def test_unknown_name_is_an_attribute_error():
    try:
        aegis_stream.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("unknown attribute resolved")


def test_import_is_cheap():
    # `aegis --version` imports the package: numpy, trio and the pipeline load only on use
    code = "import sys, aegis_stream; print(sorted(m for m in ('numpy', 'trio', 'aegis_stream.pipeline') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_classes_have_docstrings():
    for name in ("Pipeline", "Normaliser", "Lifecycle", "AgentConfig", "PipelineConfig", "Policy"):
        assert (getattr(aegis_stream, name).__doc__ or "").strip(), name


# Still being written by other work in progress; each entry goes once its docstrings are in
# (pipelines/ is not under aegis_stream/ and is not scanned here).
_DOCSTRING_PENDING: tuple[str, ...] = ()


def test_every_public_top_level_class_has_a_docstring():
    """trio's rule: a public class says what it is for.  Scans the source (AST), so classes
    that are never imported by the facade are covered too."""
    root = Path(aegis_stream.__file__).parent
    missing = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(_DOCSTRING_PENDING):
            continue
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                if not (ast.get_docstring(node) or "").strip():
                    missing.append(f"{rel}:{node.lineno} {node.name}")
    assert missing == [], "public classes without a docstring:\n" + "\n".join(missing)


def test_cli_start_does_not_load_the_pipeline():
    # every `aegis` command (the kernel suite runs hundreds under TCG) imports the CLI and
    # the event schema; the pipeline, trio and numpy load only for the commands that run it
    code = ("import sys, aegis_stream.cli.main as m; m.build_parser(); "
            "print(sorted(x for x in ('numpy', 'trio', 'aegis_stream.pipeline.pipeline') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
