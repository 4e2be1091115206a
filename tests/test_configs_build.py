"""Every training config in configs/ loads, builds its backbone and head, and matches the row it reproduces.

The reference tables below are transcribed from the public seed documents (arcface_torch and partial_fc
READMEs) and arcface_torch's published dataset sizes; they are kept apart from the configs so that a config
that drifts from its row fails here.
"""
import glob
import math
import os
import re

import pytest
import torch

import partialfc
import partialfc.comm
from partialfc.backbones import available_backbones, build_backbone
from partialfc.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
DOCS = os.path.join(ROOT, "docs", "configs.md")
ALL_CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")))
# Not reproductions of a published row: the defaults every config starts from, and the embedded CPU-sized run.
NOT_SEED_ROWS = {"base.py", "synthetic.py", "finetune_r50_from_model_zoo.py", "distill_r18_from_r100.py"}
SEEDED = [name for name in ALL_CONFIGS if name not in NOT_SEED_ROWS]

# (identities, images) of each training set, as arcface_torch's configs and dataset pages state them.
DATASETS = {
    "MS1MV2": (85742, 5822653),
    "MS1MV3": (93431, 5179510),
    "GLINT360K": (360232, 17091657),
    "WF4M": (205990, 4235242),
    "WF12M": (617970, 12720066),
    "WF12M-FLIP(40%)": (617970, 12720066),   # labels flipped, identities unchanged
    "WF12M-CONFLICT": (1017970, 12720066),   # 400k conflicting identities added
    "WF42M": (2059906, 42474557),
}

# Rows of the seed tables, "dataset | backbone | reported figures", by the table they come from.
SEED_ROWS = {
    "000 single-host": [
        "MS1MV2 | mobilefacenet-0.45G | MFR-ALL 62.07 | IJB-C(1E-4) 93.61 | IJB-C(1E-5) 90.28",
        "MS1MV2 | r50 | MFR-ALL 75.13 | IJB-C(1E-4) 95.97 | IJB-C(1E-5) 94.07",
        "MS1MV2 | r100 | MFR-ALL 78.12 | IJB-C(1E-4) 96.37 | IJB-C(1E-5) 94.27",
        "MS1MV3 | mobilefacenet-0.45G | MFR-ALL 63.78 | IJB-C(1E-4) 94.23 | IJB-C(1E-5) 91.33",
        "MS1MV3 | r50 | MFR-ALL 79.14 | IJB-C(1E-4) 96.37 | IJB-C(1E-5) 94.47",
        "MS1MV3 | r100 | MFR-ALL 81.97 | IJB-C(1E-4) 96.85 | IJB-C(1E-5) 95.02",
        "Glint360K | mobilefacenet-0.45G | MFR-ALL 70.18 | IJB-C(1E-4) 95.04 | IJB-C(1E-5) 92.62",
        "Glint360K | r50 | MFR-ALL 86.34 | IJB-C(1E-4) 97.16 | IJB-C(1E-5) 95.81",
        "Glint360k | r100 | MFR-ALL 89.52 | IJB-C(1E-4) 97.55 | IJB-C(1E-5) 96.38",
        "WF4M | r100 | MFR-ALL 89.87 | IJB-C(1E-4) 97.19 | IJB-C(1E-5) 95.48",
        "WF12M-PFC-0.2 | r100 | MFR-ALL 94.75 | IJB-C(1E-4) 97.60 | IJB-C(1E-5) 95.90",
        "WF12M-PFC-0.3 | r100 | MFR-ALL 94.71 | IJB-C(1E-4) 97.64 | IJB-C(1E-5) 96.01",
        "WF12M | r100 | MFR-ALL 94.69 | IJB-C(1E-4) 97.59 | IJB-C(1E-5) 95.97",
        "WF42M-PFC-0.2 | r100 | MFR-ALL 96.27 | IJB-C(1E-4) 97.70 | IJB-C(1E-5) 96.31",
        "WF42M-PFC-0.2 | ViT-T-1.5G | MFR-ALL 92.04 | IJB-C(1E-4) 97.27 | IJB-C(1E-5) 95.68",
        "WF42M-PFC-0.3 | ViT-B-11G | MFR-ALL 97.16 | IJB-C(1E-4) 97.91 | IJB-C(1E-5) 97.05",
    ],
    "000 multi-host": [
        "WF42M-PFC-0.2 | r50(512*8) | MFR-ALL 93.83 | IJB-C(1E-4) 97.53 | IJB-C(1E-5) 96.16 | Throughput ~5900",
        "WF42M-PFC-0.2 | r50(512*16) | MFR-ALL 93.96 | IJB-C(1E-4) 97.46 | IJB-C(1E-5) 96.12 | Throughput ~11000",
        "WF42M-PFC-0.2 | r50(128*32) | MFR-ALL 94.04 | IJB-C(1E-4) 97.48 | IJB-C(1E-5) 95.94 | Throughput ~17000",
        "WF42M-PFC-0.2 | r100(128*16) | MFR-ALL 96.28 | IJB-C(1E-4) 97.80 | IJB-C(1E-5) 96.57 | Throughput ~5200",
        "WF42M-PFC-0.2 | r100(256*16) | MFR-ALL 96.69 | IJB-C(1E-4) 97.85 | IJB-C(1E-5) 96.63 | Throughput ~5200",
        "WF42M-PFC-0.0018 | r100(512*32) | MFR-ALL 93.08 | IJB-C(1E-4) 97.51 | IJB-C(1E-5) 95.88 | Throughput ~10000",
        "WF42M-PFC-0.2 | r100(128*32) | MFR-ALL 96.57 | IJB-C(1E-4) 97.83 | IJB-C(1E-5) 96.50 | Throughput ~9800",
    ],
    "000 ViT": [
        "WF42M-PFC-0.3 | r18(128*32) | FLOPs 2.6 | MFR-ALL 79.13 | IJB-C(1E-4) 95.77 | IJB-C(1E-5) 93.36",
        "WF42M-PFC-0.3 | r50(128*32) | FLOPs 6.3 | MFR-ALL 94.03 | IJB-C(1E-4) 97.48 | IJB-C(1E-5) 95.94",
        "WF42M-PFC-0.3 | r100(128*32) | FLOPs 12.1 | MFR-ALL 96.69 | IJB-C(1E-4) 97.82 | IJB-C(1E-5) 96.45",
        "WF42M-PFC-0.3 | r200(128*32) | FLOPs 23.5 | MFR-ALL 97.70 | IJB-C(1E-4) 97.97 | IJB-C(1E-5) 96.93",
        "WF42M-PFC-0.3 | VIT-T(384*64) | FLOPs 1.5 | MFR-ALL 92.24 | IJB-C(1E-4) 97.31 | IJB-C(1E-5) 95.97 "
        "| Throughput ~35000",
        "WF42M-PFC-0.3 | VIT-S(384*64) | FLOPs 5.7 | MFR-ALL 95.87 | IJB-C(1E-4) 97.73 | IJB-C(1E-5) 96.57 "
        "| Throughput ~25000",
        "WF42M-PFC-0.3 | VIT-B(384*64) | FLOPs 11.4 | MFR-ALL 97.42 | IJB-C(1E-4) 97.90 | IJB-C(1E-5) 97.04 "
        "| Throughput ~13800",
        "WF42M-PFC-0.3 | VIT-L(384*64) | FLOPs 25.3 | MFR-ALL 97.85 | IJB-C(1E-4) 98.00 | IJB-C(1E-5) 97.23 "
        "| Throughput ~9406",
    ],
    "000 noisy": [
        "WF12M-Flip(40%) | r50 | MFR-ALL 43.87 | IJB-C(1E-4) 88.35 | IJB-C(1E-5) 80.78",
        "WF12M-Flip(40%)-PFC-0.1* | r50 | MFR-ALL 80.20 | IJB-C(1E-4) 96.11 | IJB-C(1E-5) 93.79",
        "WF12M-Conflict | r50 | MFR-ALL 79.93 | IJB-C(1E-4) 95.30 | IJB-C(1E-5) 91.56",
        "WF12M-Conflict-PFC-0.3* | r50 | MFR-ALL 91.68 | IJB-C(1E-4) 97.28 | IJB-C(1E-5) 95.75",
    ],
    "001 Glint360K": [
        "R100 | Glint360k(r=1.0) | IFRT African 89.50 | Caucasian 94.23 | Indian 93.54 | Asian 65.07 | ALL 88.67",
        "R100 | Glint360k(r=0.1) | IFRT African 90.45 | Caucasian 94.60 | Indian 93.96 | Asian 63.91 | ALL 88.23",
    ],
    "001 1M identities": ["Partial FC(Ours) | 8 | 1024 | Memory/M 8100 | Throughput img/sec 2780"],
    "001 10M identities": ["Partial FC(Ours) | 64 | 4096 | Memory/M 6722 | Throughput img/sec 12600"],
}
# Public rows outside the seed texts that some configs reproduce.
OTHER_ROWS = {
    # The model zoo of arcface_torch's earlier release (IJB-C only).
    "arcface_torch earlier model zoo": [
        "MS1MV3 | r18 | IJB-C(1E-5) 92.07 | IJB-C(1E-4) 94.66",
        "MS1MV3 | r34 | IJB-C(1E-5) 94.10 | IJB-C(1E-4) 95.90",
        "Glint360k | r18-0.1 | IJB-C(1E-5) 93.16 | IJB-C(1E-4) 95.33",
        "Glint360k | r34-0.1 | IJB-C(1E-5) 95.16 | IJB-C(1E-4) 96.56",
    ],
    # The 3-million-identity benchmark that seed 000's speed section refers to.
    "arcface_torch speed_benchmark.md": [
        "3 million identities | r50(128*8) | Partial FC 0.1 5299 samples/sec | Model Parallel 2271 samples/sec",
    ],
}
ALL_ROWS = {**SEED_ROWS, **OTHER_ROWS}

# Networks that are cheap enough on CPU to run a forward pass for every config that uses them.
FORWARD_NETWORKS = ("r18", "mbf", "vit_t", "small")


def read_header(name):
    """The leading comment block of a config file, as a list of lines without the '# '."""
    lines = []
    with open(os.path.join(CONFIG_DIR, name)) as f:
        for line in f:
            if not line.startswith("#"):
                break
            lines.append(line[1:].strip())
    return lines


def header_field(header, key, name):
    found = [line[len(key) + 1:].strip() for line in header if line.startswith(key + ":")]
    assert len(found) == 1, f"configs/{name}: header needs exactly one '# {key}:' line, found {len(found)}"
    return found[0]


def parse_seed_row(text, name):
    """'[source] row' or 'none for NET; the recipe of [source] row' -> (source, row, variant network or None)."""
    m = re.fullmatch(r"(?:none for (?P<variant>\S+); the recipe of )?\[(?P<src>[^\]]+)\] (?P<row>.+)", text)
    assert m, f"configs/{name}: 'Seed row:' must be '[source] dataset | backbone | figures', got {text!r}"
    assert m["src"] in ALL_ROWS, f"configs/{name}: unknown row source {m['src']!r}"
    assert m["row"] in ALL_ROWS[m["src"]], f"configs/{name}: {m['row']!r} is not a row of {m['src']!r}"
    return m["src"], m["row"], m["variant"]


def row_facts(src, row):
    """What a row itself says about its training: dataset, network, rate, filtering, batch and GPUs."""
    fields = row.split(" | ")
    facts = dict(dataset=None, network=None, rate=None, filtering=None, batch=None, gpus=None, global_batch=None)
    if src.startswith("001 ") and src.endswith("identities"):
        facts.update(network="r50", gpus=int(fields[1]), global_batch=int(fields[2]))  # 001: "the backbone is ResNet50"
        return facts
    if src == "001 Glint360K":
        facts.update(dataset="GLINT360K", network=fields[0].lower(),
                     rate=float(re.search(r"r=([\d.]+)", fields[1]).group(1)), filtering=False)
        return facts
    if src == "arcface_torch speed_benchmark.md":
        facts.update(network="r50", rate=float(re.search(r"Partial FC ([\d.]+)", fields[2]).group(1)),
                     num_classes=3_000_000)
    dataset, backbone = fields[0], fields[1]
    if src != "arcface_torch speed_benchmark.md":
        rate = re.search(r"-PFC-([\d.]+)", dataset) or re.search(r"-([\d.]+)$", backbone)
        facts["rate"] = float(rate.group(1)) if rate else 1.0
        facts["filtering"] = dataset.endswith("*")
        facts["dataset"] = re.sub(r"-PFC-[\d.]+\*?$", "", dataset).upper()
    size = re.search(r"\((\d+)\*(\d+)\)", backbone)
    if size:
        facts["batch"], facts["gpus"] = int(size.group(1)), int(size.group(2))
    base = backbone.split("(")[0].lower()
    base = re.sub(r"-[\d.]+$", "", base) if base.startswith("r") else base
    if base.startswith("mobilefacenet"):
        base = "mbf"
    elif base.startswith("vit-"):
        base = "vit_" + base[4]
    facts["network"] = base
    return facts


def network_family(network):
    """'vit_b_dp005_mask_005' -> 'vit_b'; iresnet and mbf names are their own family."""
    m = re.match(r"(vit_[tslbh])", network)
    return m.group(1) if m else network


@pytest.fixture(scope="module")
def configs():
    return {name: load_config(os.path.join(CONFIG_DIR, name)) for name in ALL_CONFIGS}


def test_the_required_configs_exist():
    required = ["ms1mv2_r50", "ms1mv3_r100", "glint360k_r100", "wf4m_r50", "wf12m_pfc02_r100",
                "wf42m_pfc02_16gpus_r50_bs8k", "wf42m_pfc03_40epoch_8gpu_vit_b", "wf42m_pfc0008_32gpu_r100",
                "wf12m_flip_pfc01_filter04_r50", "3millions"]
    missing = [n for n in required if n + ".py" not in ALL_CONFIGS]
    assert not missing, f"missing configs: {missing}"


def test_every_seed_table_row_has_a_config():
    covered = set()
    for name in SEEDED:
        src, row, variant = parse_seed_row(header_field(read_header(name), "Seed row", name), name)
        if variant is None:
            covered.add((src, row))
    missing = [f"[{src}] {row}" for src, rows in ALL_ROWS.items() for row in rows if (src, row) not in covered]
    assert not missing, "rows without a config reproducing them:\n" + "\n".join(missing)


def test_dataset_sizes_agree_with_the_seed_texts():
    # The seeds round: "MS1MV2 (87k IDs, 5.8M images)", "MS1MV3 (93k IDs, 5.2M images)", "Glint360K (360k IDs,
    # 17.1M images)", "WebFace42M (2M IDs, 42.5M images)"; partial_fc's MXNet config notes "glint360k 17091657".
    assert round(DATASETS["MS1MV2"][1] / 1e6, 1) == 5.8  # its "87k IDs" is 85,742 in faces_emore's property file
    assert (round(DATASETS["MS1MV3"][0] / 1e3), round(DATASETS["MS1MV3"][1] / 1e6, 1)) == (93, 5.2)
    assert (round(DATASETS["GLINT360K"][0] / 1e3), round(DATASETS["GLINT360K"][1] / 1e6, 1)) == (360, 17.1)
    assert DATASETS["GLINT360K"][1] == 17091657
    assert (round(DATASETS["WF42M"][0] / 1e6), round(DATASETS["WF42M"][1] / 1e6, 1)) == (2, 42.5)


@pytest.mark.parametrize("name", SEEDED)
def test_config_matches_its_seed_row(name, configs):
    cfg = configs[name]
    stem = name[:-3]
    header = read_header(name)
    assert header and not header[0].startswith("Seed row"), f"configs/{name}: first line should say what it trains"
    src, row, variant = parse_seed_row(header_field(header, "Seed row", name), name)
    facts = row_facts(src, row)

    # The dataset: stated sizes, matching the row's dataset and the header.
    assert isinstance(cfg.num_classes, int) and cfg.num_classes > 0, f"configs/{name}: num_classes not stated"
    assert isinstance(cfg.num_image, int) and cfg.num_image > 0, f"configs/{name}: num_image not stated"
    if facts["dataset"] is not None:
        assert (cfg.num_classes, cfg.num_image) == DATASETS[facts["dataset"]], (name, facts["dataset"])
        assert cfg.rec.startswith("/"), f"configs/{name}: rec should be a placeholder path, got {cfg.rec!r}"
    else:
        assert cfg.rec == "random", f"configs/{name}: throughput rows train on rec='random'"
    if facts.get("num_classes"):
        assert cfg.num_classes == facts["num_classes"]
    dataset_line = header_field(header, "Dataset", name)
    assert f"{cfg.num_classes:,} identities" in dataset_line and f"{cfg.num_image:,} " in dataset_line, dataset_line

    # The network: the row's own backbone, or for a recipe variant the one the header names instead.
    if variant is None:
        assert network_family(cfg.network) == facts["network"], (name, cfg.network, row)
    else:
        assert cfg.network == variant and network_family(cfg.network) != facts["network"], (name, variant)
        assert "No accuracy is reported" in " ".join(header), f"configs/{name}: say that the row is not reported"

    # Sampling rate and inter-class filtering.
    if facts["rate"] is not None:
        assert cfg.sample_rate == facts["rate"], (name, cfg.sample_rate, row)
    if facts["filtering"] is not None:
        assert (cfg.interclass_filtering_threshold > 0) == facts["filtering"], name
    if "filter04" in stem:
        assert cfg.interclass_filtering_threshold == 0.4

    # GPUs and batch sizes: the header, the file name and the row agree.
    gpus_line = header_field(header, "GPUs", name)
    gpus = int(re.match(r"(\d+) ", gpus_line).group(1))
    global_batch = gpus * cfg.batch_size * cfg.gradient_acc
    assert gpus_line.endswith(f"= {global_batch:,}."), (name, gpus_line, global_batch)
    if facts["gpus"] is not None:
        assert gpus == facts["gpus"], (name, gpus, row)
    if facts["batch"] is not None:
        assert cfg.batch_size == facts["batch"], (name, cfg.batch_size, row)
    if facts["global_batch"] is not None:
        assert gpus * cfg.batch_size == facts["global_batch"], (name, row)
    m = re.search(r"_(\d+)gpus?(?:_|$)", stem)
    if m:
        assert gpus == int(m.group(1)), f"configs/{name}: the name says {m.group(1)} GPUs, the header {gpus}"
    m = re.search(r"_bs(\d+)k(?:_|$)", stem)
    if m:
        assert global_batch == int(m.group(1)) * 1024, f"configs/{name}: the name says bs{m.group(1)}k"
    m = re.search(r"_(\d+)epoch", stem)
    if m:
        assert cfg.num_epoch == int(m.group(1))

    # The launch command starts the stated number of processes on this very file.
    launch = header_field(header, "Launch", name)
    assert f"configs/{name}" in launch
    assert f"--nproc_per_node={gpus} " in launch or f"-np {gpus} " in launch, (name, launch)

    # The optimizer follows arcface_torch: AdamW for ViT, SGD otherwise; the output dir defaults to the name.
    assert cfg.optimizer == ("adamw" if cfg.network.startswith("vit") else "sgd"), name
    assert cfg.output == os.path.join("work_dirs", stem)


def test_well_known_rows(configs):
    c = configs["ms1mv3_r100.py"]
    assert (c.num_classes, c.num_image, c.margin_list, c.network) == (93431, 5179510, (1.0, 0.5, 0.0), "r100")
    c = configs["glint360k_r100.py"]
    assert (c.num_classes, c.num_image, c.margin_list) == (360232, 17091657, (1.0, 0.0, 0.4))
    for name in ("wf42m_pfc02_16gpus_r50_bs8k.py", "wf42m_pfc03_40epoch_8gpu_vit_b.py",
                 "wf42m_pfc0008_32gpu_r100.py"):
        assert (configs[name].num_classes, configs[name].num_image) == (2059906, 42474557), name
    c = configs["wf42m_pfc02_16gpus_r50_bs8k.py"]
    assert (c.network, c.batch_size, c.sample_rate, c.lr, c.warmup_epoch) == ("r50", 512, 0.2, 0.6, 4)
    c = configs["wf42m_pfc03_40epoch_8gpu_vit_b.py"]
    assert (c.optimizer, c.lr, c.weight_decay, c.sample_rate) == ("adamw", 0.001, 0.1, 0.3)
    assert c.batch_size * c.gradient_acc * 8 == 24576  # "Run ViT-B on a machine with 24k batchsize"
    c = configs["wf12m_flip_pfc01_filter04_r50.py"]
    assert (c.sample_rate, c.interclass_filtering_threshold, c.num_classes) == (0.1, 0.4, 617970)
    c = configs["3millions.py"]
    assert (c.rec, c.network, c.sample_rate, c.fp16, c.num_classes) == ("random", "r50", 0.1, True, 3_000_000)
    c = configs["wf4m_r50.py"]
    assert (c.network, c.num_classes, c.num_image) == ("r50", 205990, 4235242)


def test_positive_only_row_keeps_only_positive_centers(configs):
    # arcface_torch trains WF42M-PFC-0.0018 with sample_rate 0 (positives only). The rate here must be so small
    # that a rank's budget stays below the positives its share of the 32 x 512 global batch brings.
    c = configs["wf42m_pfc0008_32gpu_r100.py"]
    gpus, global_batch = 32, 32 * c.batch_size
    budget = math.ceil(c.sample_rate * math.ceil(c.num_classes / gpus))
    # WebFace42M averages 20.6 images per identity, so a random batch has nearly all-distinct labels.
    expected_positives_per_rank = global_batch / gpus * (1 - global_batch / c.num_classes)
    assert budget < 0.5 * expected_positives_per_rank, (budget, expected_positives_per_rank)


_BUILT = {}


def _backbone(cfg):
    """Build once per distinct (network, embedding size, fp16, dropout, checkpointing)."""
    key = (cfg.network, cfg.embedding_size, bool(cfg.fp16), cfg.dropout, cfg.gradient_checkpointing)
    if key not in _BUILT:
        _BUILT[key] = build_backbone(cfg)
    return _BUILT[key]


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_builds_backbone_and_head(name, configs):
    cfg = configs[name]
    assert cfg.network in available_backbones(), f"configs/{name}: network {cfg.network!r} is not registered"
    torch.manual_seed(0)
    backbone = _backbone(cfg)
    assert isinstance(backbone, torch.nn.Module)
    if network_family(cfg.network) in FORWARD_NETWORKS:
        backbone.eval()
        with torch.no_grad():
            out = backbone(torch.rand(2, 3, 112, 112) * 2 - 1)
        assert out.shape == (2, cfg.embedding_size), (name, tuple(out.shape))
        assert torch.isfinite(out.float()).all()
        embeddings = out.float()
    else:
        embeddings = torch.randn(2, cfg.embedding_size)

    num_classes = min(cfg.num_classes or cfg.synthetic_ids, 1000)
    head = partialfc.PartialFC(cfg.embedding_size, num_classes=num_classes, sample_rate=cfg.sample_rate,
                               margin=(cfg.scale, *cfg.margin_list), comm=partialfc.comm.Communicator(),
                               interclass_filtering_threshold=cfg.interclass_filtering_threshold)
    assert head.num_sample == min(num_classes, math.ceil(cfg.sample_rate * num_classes))
    embeddings.requires_grad_(True)
    loss = head(embeddings, torch.tensor([3, num_classes - 1]))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0, (name, loss.item())
    assert torch.isfinite(embeddings.grad).all()


def _docs_table():
    rows = {}
    with open(DOCS) as f:
        for line in f:
            m = re.match(r"\| `configs/([^`]+)` \|(.*)\|\s*$", line)
            if m:
                assert m.group(1) not in rows, f"docs/configs.md lists {m.group(1)} twice"
                rows[m.group(1)] = [cell.strip() for cell in m.group(2).split("|")]
    return rows


def test_docs_table_matches_the_configs(configs):
    table = _docs_table()
    assert sorted(table) == SEEDED, "docs/configs.md must list exactly the seed-row configs"
    for name in SEEDED:
        cfg, cells = configs[name], table[name]
        seed, gpus, batch, global_batch, rate, epochs, accuracy, launch = cells
        header = read_header(name)
        header_gpus = int(header_field(header, "GPUs", name).split()[0])
        assert int(gpus) == header_gpus, name
        assert int(batch.split()[0]) == cfg.batch_size, name
        assert int(global_batch.replace(",", "")) == header_gpus * cfg.batch_size * cfg.gradient_acc, name
        assert float(rate) == cfg.sample_rate, name
        if cfg.max_steps:
            assert epochs == f"{cfg.max_steps:,} steps", name
        else:
            assert int(epochs) == cfg.num_epoch, name
        src, row, variant = parse_seed_row(header_field(header, "Seed row", name), name)
        figures = ", ".join(row.split(" | ")[2:])
        assert accuracy == ("not reported" if variant else figures), (name, accuracy)
        assert launch.strip("`") in header_field(header, "Launch", name), name
