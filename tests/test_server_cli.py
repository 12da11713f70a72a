"""`python -m server` commands (in-process) and the configuration file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.__main__ import main
from server.config import ConfigError, load_config
from tests.server_fixtures import write_checkpoint, write_plan_dir

CONFIG = """
database = "state/db.sqlite"
artifact_dir = "state/artifacts"
state_dir = "state/private"
bind = "127.0.0.1:9999"

[populations.en]
goal = 6
server_optimizer = "adam"
server_lr = 0.01
ineligible_retry_s = [60, 120]

[populations.en.eligibility]
min_battery = 0.25
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text(CONFIG)
    return path


def test_config_file_paths_defaults_and_errors(config_file, tmp_path):
    cfg = load_config(config_file)
    assert cfg.database == tmp_path / "state" / "db.sqlite" and cfg.workers == 2
    pop = cfg.population("en")
    assert (pop.goal, pop.max_selected, pop.min_selected, pop.min_reports) == (6, 8, 5, 5)   # min cohort 5
    assert pop.ineligible_retry_s == (60.0, 120.0) and pop.eligibility.min_battery == 0.25
    assert pop.eligibility.require_charging and pop.over_selection == 1.3
    for bad, match in [("nonsense = 1", "unknown key"), ("[populations.en]\ngoal = 0", "goal"),
                       ("[populations.en]\nserver_optimizer = 'lamb'", "server_optimizer"),
                       ("[populations.en.eligibility]\nmin_battery = 2", "min_battery"),
                       ("[populations.en]\nover_selection = 0.5", "over_selection"), ("= broken", "TOML"),
                       ("[populations.en]\ngoal = 3", "min_round_size"),
                       ("[populations.en.update]\nbits = 12", "update.bits"),
                       ("[populations.en.enrollment]\nissuer_public_key = 'xyz'", "issuer_public_key"),
                       ("[rate_limits]\ncheckin_per_device = [10, 0]", "rate_limits.checkin_per_device")]:
        path = tmp_path / "bad.toml"
        path.write_text(bad)
        with pytest.raises(ConfigError, match=match):
            load_config(path)
    with pytest.raises(ConfigError, match="no file"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "min.toml").write_text("[populations.en]\ngoal = 5\n")
    minimal = load_config(tmp_path / "sub" / "min.toml")    # default paths sit beside the file too
    assert minimal.database == tmp_path / "sub" / "nightjar-state" / "nightjar.db"


def test_init_status_rollback(config_file, tmp_path, capsys):
    write_checkpoint(tmp_path / "init.safetensors")
    args = ["init", "--config", str(config_file), "--checkpoint", str(tmp_path / "init.safetensors")]
    assert main(args + ["--plan-dir", str(write_plan_dir(tmp_path / "plan"))]) == 0
    out = capsys.readouterr().out
    assert "version 0" in out and "operator token: in" in out and "enrollment:" in out
    token = (tmp_path / "state" / "private" / "operator_token")
    assert token.is_file() and oct(token.stat().st_mode & 0o777) == "0o600" and len(token.read_text()) > 40
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["status", "--config", str(config_file)]) == 0
    assert "current version 0, published None" in capsys.readouterr().out
    assert main(["rollback", "--config", str(config_file)]) == 2
    assert "nothing published" in capsys.readouterr().err
    assert main(["publish", "--config", str(config_file)]) == 0
    assert main(["status", "--config", str(config_file), "--population", "fr"]) == 2


def test_init_refuses_bad_inputs(config_file, tmp_path, capsys):
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    junk = str(tmp_path / "junk.safetensors")
    assert main(["init", "--config", str(config_file), "--checkpoint", junk]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    write_checkpoint(tmp_path / "init.safetensors")
    plan = write_plan_dir(tmp_path / "plan")
    (plan / "plan.tflite").write_bytes(b"tampered")
    assert main(["init", "--config", str(config_file), "--checkpoint", str(tmp_path / "init.safetensors"),
                 "--plan-dir", str(plan)]) == 2
    assert "sha256" in capsys.readouterr().err
    assert main(["init", "--config", str(config_file), "--checkpoint", str(tmp_path / "init.safetensors"),
                 "--plan-dir", str(write_plan_dir(tmp_path / "plan8", batch_size=8))]) == 2
    assert "batches of 8" in capsys.readouterr().err
    assert main(["init", "--config", str(tmp_path / "nope.toml"), "--checkpoint", "x"]) == 2


def test_the_server_process_never_imports_tensorflow(tmp_path):
    code = ("import sys; from server import create_app; import server.__main__; "
            f"create_app({{'database': r'{tmp_path}/db', 'artifact_dir': r'{tmp_path}/a', "
            f"'state_dir': r'{tmp_path}/p', 'tick_interval_s': 0}}); "
            "bad = [m for m in sys.modules"
            " if m.split('.')[0] in ('tensorflow', 'keras', 'tensorflow_federated')]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
