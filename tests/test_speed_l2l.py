"""The speed benchmark's learn2learn rows: refused with advice where learn2learn is absent, the
stand-in modules that replace torchvision for its import, and the speed-ups they are given."""

from __future__ import annotations

import importlib
import sys

import pytest

from tests.test_variants import speed


@pytest.mark.skipif(speed.learn2learn_installed(), reason="learn2learn is installed here")
def test_l2l_rows_without_learn2learn(capsys):
    assert {"l2l-MAML", "l2l-FOMAML"} <= set(speed.choices())
    assert not set(speed.parse_args([]).variants) & speed.L2L.keys()
    with pytest.raises(SystemExit):
        speed.parse_args(["--variants", "MAML", "l2l-FOMAML"])
    assert "DEVELOPERS.md" in capsys.readouterr().err
    with pytest.raises(ModuleNotFoundError, match=r"DEVELOPERS\.md"):
        speed.import_learn2learn.__wrapped__()


def test_stub_modules():
    finder = speed._StubFinder("no_such_package_l2l")
    sys.meta_path.insert(0, finder)
    try:
        stub = importlib.import_module("no_such_package_l2l.datasets.folder")
        from no_such_package_l2l import transforms  # a submodule, looked up as an attribute

        class Folder(stub.ImageFolder):  # a stand-in class can be subclassed
            pass

        assert transforms.__name__ == "no_such_package_l2l.transforms"
        assert stub.ImageFolder is stub.ImageFolder
        assert importlib.import_module("json").__name__ == "json"  # others are not stubbed
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.startswith("no_such_package_l2l")]:
            del sys.modules[name]


def test_speedups_against_the_loop_and_learn2learn(capsys):
    rows = [
        {"variant": v, "inner_steps": 1, "ms": ms, "median_ms": ms, "peak_mib": 1.0}
        for v, ms in [
            ("MAML", 50.0),
            ("FOMAML", 20.0),
            ("loop-MAML", 100.0),
            ("loop-FOMAML", 60.0),
            ("l2l-MAML", 80.0),
            ("l2l-FOMAML", 40.0),
        ]
    ]
    speed.print_block(rows)
    by = {r["variant"]: (r["speedup_vs_loop"], r["speedup_vs_l2l"]) for r in rows}
    assert by == {
        "MAML": (2.0, 1.6),
        "FOMAML": (3.0, 2.0),
        "loop-MAML": (None, None),
        "loop-FOMAML": (None, None),
        "l2l-MAML": (1.25, None),
        "l2l-FOMAML": (1.5, None),
    }
    assert "1.60x" in capsys.readouterr().out


def test_double_backward_both_times_each_row_beside_pytorchs(capsys):
    args = speed.parse_args(
        [
            "--setup",
            "omniglot",
            "--variants",
            "MAML",
            "loop-MAML",
            "--meta-batch-size",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--double-backward",
            "both",
        ]
    )
    block = speed.measure_block(args, args.variants, 1)
    assert [r["variant"] for r in block] == ["MAML", "MAML [torch 2nd]", "loop-MAML"]
    speed.print_block(block)
    loop = block[2]["ms"]
    for row in block[:2]:
        assert row["speedup_vs_loop"] == pytest.approx(loop / row["ms"])
    assert "MAML [torch 2nd]" in capsys.readouterr().out
