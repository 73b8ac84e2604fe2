"""The house: every module sits in a room, imports run one way (downwards), there is no import cycle, and
the read-only commands import no torch until a tensor is read."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from cachebuild.config import BucketConfig, LatentsConfig, LatentsMode, ModelSpec
from cachebuild.jobs.latents import build_latents

PACKAGE = Path(__file__).resolve().parents[1] / "cachebuild"

# Rank of each room: a module may import from its own room or from a room of lower rank, never higher.
# Rooms of equal rank (engines and consumers; sources, images and encode) do not import each other.
ROOMS = {
    "errors": 0,
    "config": 1,
    "keys": 1,
    "storage": 1,  # fsspec URLs as paths: imports only errors
    "hub": 2,
    "cache": 3,
    "sources": 4,
    "images": 4,
    "encode": 4,
    "families": 5,
    "video": 5,  # clips, probe, decode: above images, whose bucket plan and loader it reuses
    "engines": 6,
    "consumers": 6,
    "jobs": 7,
    "project": 8,  # project files and watch: above the jobs they call, below the command line
    "testing": 9,
    "cli": 9,
    "__main__": 10,
    "offload": 3,  # below encode and families, which both use it; it needs only config
    "keep": 1,  # models kept between runs: imports nothing of the package
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package itself (its lazy public names)


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported cachebuild module, inside `if TYPE_CHECKING`) for every import in the file, nested ones too."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for child in node.body for n in ast.walk(child)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cachebuild"):
            base = node.module
            for alias in node.names:  # `from cachebuild.jobs import latents` names a module
                sub = f"{base}.{alias.name}"
                target = sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() else base
                found.append((target, id(node) in typing_only))
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in typing_only) for a in node.names if a.name.startswith("cachebuild")]
    return found


def graph() -> dict[str, list[tuple[str, bool]]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_is_in_a_room():
    assert {room_of(m) for m in graph()} - {None} <= ROOMS.keys()


def test_imports_never_climb_to_a_higher_room():
    climbs = []
    for module, imports in graph().items():
        room = room_of(module)
        if room is None:
            continue
        for target, _ in imports:
            other = room_of(target)
            if other is None or other == room:
                continue
            if ROOMS[other] >= ROOMS[room]:
                climbs.append(f"{module} -> {target}")
    assert not climbs, "imports that climb or cross rooms:\n" + "\n".join(climbs)


def test_consumers_never_import_a_job():
    for module, imports in graph().items():
        if room_of(module) == "consumers":
            assert not [t for t, _ in imports if room_of(t) in ("jobs", "engines")], module


def test_there_is_no_import_cycle():
    edges = {m: {t for t, typing_only in imps if not typing_only and t != m} for m, imps in graph().items()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if t.startswith("cachebuild.") and state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t) :] + [t]))
            if state.get(t) is None and t in edges:
                visit(t, path + [t])
        state[m] = 2

    for m in edges:
        if state.get(m) is None:
            visit(m, [m])


def test_the_layer_check_catches_a_climb(tmp_path, monkeypatch):
    """The check above is not vacuous: a cache module importing a job is reported."""
    fake = tmp_path / "cachebuild"
    (fake / "cache").mkdir(parents=True)
    (fake / "jobs").mkdir()
    (fake / "jobs" / "latents.py").write_text("")
    (fake / "cache" / "bad.py").write_text("from cachebuild.jobs.latents import build_latents\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    try:
        test_imports_never_climb_to_a_higher_room()
    except AssertionError as exc:
        assert "cachebuild.cache.bad -> cachebuild.jobs.latents" in str(exc)
    else:
        raise AssertionError("a climbing import was not reported")


READ_ONLY_NO_TORCH = """
import sys
from cachebuild.cli import cli
from cachebuild import open_cache
try:
    cli(["status", sys.argv[1]], standalone_mode=False)
except SystemExit:
    pass
cache = open_cache(sys.argv[1])
assert cache.keys() and cache.info(cache.keys()[0])["bucket"] and cache.bucket(cache.keys()[0])
import cachebuild.consumers.verify  # noqa: F401
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "safetensors") if m in sys.modules)
print("HEAVY", heavy)
"""


def test_status_and_open_cache_import_no_torch(tmp_path, tiny_vae, dataset):
    out = tmp_path / "c"
    build_latents(
        LatentsConfig(
            dataset,
            out,
            ModelSpec(vae=str(tiny_vae)),
            BucketConfig((128, 128), 64, 256),
            latents=LatentsMode.MEAN,
            workers=0,
            device="cpu",
        )
    )
    proc = subprocess.run(
        [sys.executable, "-c", READ_ONLY_NO_TORCH, str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout
