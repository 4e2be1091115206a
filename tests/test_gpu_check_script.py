"""benchmarks/gpu_check.sh, checked without a GPU: its syntax, its stages, the files it names, its training
overrides (a valid config that needs no Horovod), and its backbone-only timing snippet run on the CPU."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from partialfc.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
STAGES = ["versions", "build", "tests_ops_cuda", "tests_cuda_ops", "tests_partial_fc_cuda", "sanitizer",
          "head_step_bf16", "finite_check", "host_centers", "train_head", "backbone_only"]


@pytest.fixture(scope="module")
def text():
    with open(SCRIPT) as f:
        return f.read()


def heredoc(text, opener):
    """The body of the ``<<'PY'`` here-document on the line that contains ``opener``."""
    start = text.index(opener)
    body_start = text.index("\n", text.index("<<'PY'", start)) + 1
    return text[body_start:text.index("\nPY\n", body_start) + 1]


def train_overrides(text):
    """The script's ``TRAIN_OVERRIDES`` array as bash expands it (GPU_CHECK_TRAIN_STEPS at its default 40)."""
    block = re.search(r"^TRAIN_OVERRIDES=\(\n.*?^\)\n", text, re.M | re.S).group(0)
    proc = subprocess.run(["bash", "-c", 'TRAIN_STEPS=40\n' + block + 'printf "%s\\n" "${TRAIN_OVERRIDES[@]}"'],
                          capture_output=True, text=True, check=True)
    return proc.stdout.splitlines()


def test_bash_syntax():
    bash = shutil.which("bash")
    assert bash, "bash not found"
    proc = subprocess.run([bash, "-n", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_stage_runs_in_order_under_a_timeout(text):
    names = re.findall(r"^run_stage (\w+) (\d+) ", text, re.M)
    assert [name for name, _ in names] == STAGES
    assert all(0 < int(cap) <= 300 for _, cap in names)
    assert "timeout --kill-after" in text and 'BUDGET=${GPU_CHECK_BUDGET_S:-420}' in text
    # What each stage has to run.
    for needle in ("torch.cuda.get_device_capability()", "TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=16",
                   "setup.py build_ext --inplace", "compute-sanitizer --tool memcheck",
                   "benchmarks/head_step.py --device cuda --dtype bfloat16",
                   "--classes 1000000 10000000 --batch 512 --variants fused dense gemm --json",
                   "benchmarks/finite_check.py --device cuda --classes 10000000 --batch 512",
                   "-m torch.distributed.run --standalone --nproc_per_node=1 -m partialfc.train",
                   "tests/ops -k \"cuda and not compile\"", "tests/ops/test_cuda_ops.py",
                   "tests/test_partial_fc.py -k cuda", 'OUTDIR=${1:-${OUT:-$ROOT/gpu_check_out}}', "summary.txt"):
        assert needle in text, needle
    # figures() reads key figures off every stage's log.
    body = text[text.index("figures() {"):text.index("\n}\n", text.index("figures() {"))]
    cases = set(re.findall(r"^    ([\w*]+)\)", body, re.M))
    for stage in STAGES:
        assert stage in cases or (stage.startswith("tests_") and "tests_*" in cases), stage


def test_it_names_only_files_that_exist(text):
    paths = set(re.findall(r"(?<![\w/.$])((?:benchmarks|tests|configs|partialfc|csrc|docs)/[\w./-]*\w)", text))
    paths |= {"setup.py"} if "setup.py" in text else set()
    assert {"benchmarks/head_step.py", "tests/ops/test_cuda_ops.py", "configs/partial_fc_1millions_8gpu_r50.py",
            "tests/test_partial_fc.py", "setup.py"} <= paths
    missing = sorted(p for p in paths if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f"gpu_check.sh names files that do not exist: {missing}"
    # Modules run with -m, and the Python modules the snippets import.
    modules = set(re.findall(r"-m (partialfc(?:\.\w+)+)", text))
    modules |= set(re.findall(r"^from (partialfc(?:\.\w+)*) import", text, re.M))
    assert "partialfc.train" in modules
    for module in modules:
        base = os.path.join(ROOT, *module.split("."))
        assert os.path.exists(base + ".py") or os.path.isdir(base), module


def test_training_overrides_make_a_valid_random_r50_bf16_config_without_horovod(text):
    config_path = re.search(r"^TRAIN_CONFIG=(\S+)", text, re.M).group(1)
    config = load_config(os.path.join(ROOT, config_path), train_overrides(text) + ["output=/nonexistent/run"])
    assert (config.rec, config.network, config.num_classes, config.sample_rate) == ("random", "r50", 2_000_000, 0.1)
    assert config.num_image and config.amp_dtype == "bfloat16" and config.comm_backend == "torch"
    assert config.max_steps == 40 and config.val_targets == [] and config.verbose == 0
    assert "horovodrun" not in text and "comm_backend=torch" in text


def test_training_imports_and_backend_choice_need_no_horovod():
    # horovod made unimportable: the trainer imports, and torchrun's environment selects torch.distributed.
    code = ("import os, sys\n"
            "sys.modules['horovod'] = None\nsys.modules['horovod.torch'] = None\n"
            "import partialfc.train, partialfc.comm\n"
            "os.environ.update(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0')\n"
            "print(partialfc.comm._launcher_backend())\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "torch"


def test_backbone_snippet_times_the_backbone_on_cpu(text, tmp_path):
    snippet = tmp_path / "backbone_only.py"
    snippet.write_text(heredoc(text, "write_backbone_snippet() {"))
    config_path = re.search(r"^TRAIN_CONFIG=(\S+)", text, re.M).group(1)
    # The script's overrides, made CPU-sized: one process, r18, a batch of 2.
    overrides = train_overrides(text) + ["comm_backend=single", "device=cpu", "network=r18", "batch_size=2",
                                         f"output={tmp_path / 'run'}"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(snippet), "1", "2", config_path, *overrides], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"backbone only: r18 batch 2 amp torch\.bfloat16: ([0-9.]+) samples/s "
                         r"\(mean ([0-9.]+) ms/step, median ([0-9.]+) ms over 2 steps after 1\)", line)
    assert match, line
    rate, mean_ms = float(match.group(1)), float(match.group(2))
    assert rate > 0 and rate == pytest.approx(2 / (mean_ms / 1e3), rel=0.01, abs=0.05)  # printed to 0.1


def test_summary_figures_are_read_off_each_kind_of_log(text, tmp_path):
    """figures() on logs in the formats pytest -q, compute-sanitizer, head_step.py and the trainer print."""
    logs = {
        "tests_cuda_ops": "..F.\n=== short test summary info ===\nFAILED a::b\n"
                          "1 failed, 12 passed, 3 deselected in 6.99s\n",
        "sanitizer": "========= ERROR SUMMARY: 0 errors\n===== 30 passed, 8 deselected in 50.1s =====\n",
        "head_step_bf16": "\n1,000,000 classes (S = 100,000 sampled)\n  variant  median ms  alone ms  peak extra MiB\n"
                          "  fused   14.0  16.6  21\n  dense / fused            = 8.070x (paired 7.043x)\n",
        "train_head": "05:29:52 step 40/40  epoch 0  loss 34.7969  lr 0.00000  speed 2950.3 samples/s  eta 0.00h  "
                      "peak mem 31003 MB\n",
        "backbone_only": "backbone only: r50 batch 128 amp torch.bfloat16: 3300.5 samples/s (mean 38.78 ms/step, "
                         "median 38.70 ms over 30 steps after 5)\n",
    }
    functions = "".join(re.findall(r"^(?:pytest_counts|figures)\(\) \{\n.*?^\}\n", text, re.M | re.S))
    assert functions.count("() {") == 2
    got = {}
    for stage, content in logs.items():
        path = tmp_path / f"{stage}.log"
        path.write_text(content)
        proc = subprocess.run(["bash", "-c", functions + f'figures {stage} "{path}"'], capture_output=True,
                              text=True, check=True)
        got[stage] = proc.stdout.strip()
    assert got["tests_cuda_ops"] == "1 failed, 12 passed, 3 deselected in 6.99s"
    assert got["sanitizer"] == "========= ERROR SUMMARY: 0 errors;30 passed, 8 deselected in 50.1s;"
    assert got["head_step_bf16"] == ("1,000,000 classes (S = 100,000 sampled); fused 14.0 16.6 21; "
                                     "dense / fused = 8.070x (paired 7.043x);")
    assert got["train_head"] == "step 40/40;loss 34.7969;speed 2950.3 samples/s;peak mem 31003 MB;"
    assert got["backbone_only"] == logs["backbone_only"].strip()
