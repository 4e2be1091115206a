"""The README's main job: `bash run.sh` trains the synthetic config on 2 processes, on a CPU, from an
untrained model that cannot verify the held-out pairs to one that can."""
import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_sh_learns_the_synthetic_identities(tmp_path):
    for tool in ("mpirun",):
        if subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True).returncode:
            pytest.fail(f"{tool} is missing: run setup-utils/install.sh")
    output = tmp_path / "synthetic"
    proc = subprocess.run(["bash", "run.sh", "configs/synthetic.py", f"output={output}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in open(output / "metrics.jsonl")]
    assert records[0]["step"] == 0 and records[0]["target"] == "synthetic_val"
    assert records[0]["accuracy"] <= 0.75, records[0]
    assert records[-1]["step"] > 0 and records[-1]["accuracy"] >= 0.95, records
    assert "world size 2 (horovod)" in proc.stdout
    assert os.path.isfile(output / "model.pt")
