"""``cpubone list`` and ``cpubone info``: thin commands over the library, clear errors."""
import json

from cpubone.models.macs import count_macs
from cpubone.cli import main
from cpubone.models import VARIANTS, create_model


def test_list_json(capsys):
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == list(VARIANTS)
    for r in rows:
        assert r["params"] == r["released_params"] and r["macs"] == r["released_macs_224"]


def test_list_table(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "cpubone_b2_5" in out and "519,710,080" in out


def test_info_per_stage_table(capsys):
    assert main(["info", "cpubone_b0", "--size", "240", "320", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    model = create_model("cpubone_b0")
    assert s["macs"] == count_macs(model, (240, 320)).total
    stages = {r["stage"]: r for r in s["stages"]}
    assert stages["stages.2"]["resolution"] == "15x20" and stages["stages.2"]["channels"] == 128
    assert stages["stages.2"]["blocks"] == 4  # downsample + 3 CPUBone blocks
    assert stages["stages.3"]["resolution"] == "8x10"
    # the table accounts for every MAC and parameter
    assert sum(r["macs"] for r in s["stages"]) == s["macs"]
    assert sum(r["params"] for r in s["stages"]) == s["params"]


def test_info_bad_input(capsys):
    assert main(["info", "cpubone_b0", "--size", "16", "224"]) == 2
    assert "height and width must be at least 32" in capsys.readouterr().err
    assert main(["info", "cpubone_b9"]) == 2
    assert "unknown model 'cpubone_b9'" in capsys.readouterr().err
