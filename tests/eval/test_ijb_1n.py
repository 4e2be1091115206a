"""IJB 1:N identification: rank-N rates and TPIR at FPIR against a brute-force search written out here."""
import json
import math
import os

import cv2
import numpy as np
import pytest
import torch

from partialfc.backbones import get_model
from partialfc.eval import ijb
from test_ijb import _independent_face_features, _make_fixture

FPIRS = (0.01, 0.1)
RANKS = (1, 5, 10)


# -- the reference: one probe at a time ----------------------------------------------------------------------
def _pool(feats, templates, medias, wanted):
    """Template features by loops: mean over a media's faces, sum over medias, L2-normalize."""
    out = {}
    for t in wanted:
        sel = [i for i in range(len(templates)) if templates[i] == t]
        by_media = {}
        for i in sel:
            by_media.setdefault(medias[i], []).append(feats[i])
        v = sum(np.mean(rows, axis=0) for rows in by_media.values())
        out[t] = v / np.linalg.norm(v)
    return out


def _brute_force(probes, gallery):
    """``probes``/``gallery``: lists of ``(subject, feature)``. Each probe's subjects are sorted by their best
    template score, a tie placing the mate after the other subject; the threshold at FPIR f is the lowest
    candidate (a non-mated top score or -inf) whose non-mated fraction strictly above it is at most f."""
    mated_ranks, mated_scores, nonmated_tops = [], [], []
    for subject, feat in probes:
        best = {}
        for g_subject, g_feat in gallery:
            best[g_subject] = max(best.get(g_subject, -np.inf), float(np.dot(feat, g_feat)))
        ordered = sorted(best, key=lambda s: (-best[s], s == subject))
        if subject in best:
            mated_ranks.append(ordered.index(subject) + 1)
            mated_scores.append(best[subject])
        else:
            nonmated_tops.append(best[ordered[0]])
    rank = {k: (sum(r <= k for r in mated_ranks) / len(mated_ranks) if mated_ranks else math.nan) for k in RANKS}
    tpir = {}
    for f in FPIRS:
        if not mated_ranks or not nonmated_tops:
            tpir[f] = math.nan
            continue
        candidates = sorted(set(nonmated_tops)) + [-np.inf]
        ok = [t for t in candidates if sum(s > t for s in nonmated_tops) / len(nonmated_tops) <= f]
        t = min(ok)
        hits = sum(1 for r, s in zip(mated_ranks, mated_scores) if r == 1 and s > t)
        tpir[f] = hits / len(mated_ranks)
    return rank, tpir, len(mated_ranks), len(nonmated_tops)


def _assert_matches(got, ref):
    rank, tpir, n_mated, n_nonmated = ref
    assert got["num_mated"] == n_mated and got["num_nonmated"] == n_nonmated
    for k in RANKS:
        assert got["rank"][k] == pytest.approx(rank[k], nan_ok=True, abs=1e-12), f"rank-{k}"
    for f in FPIRS:
        assert got["tpir"][f] == pytest.approx(tpir[f], nan_ok=True, abs=1e-12), f"TPIR at FPIR {f}"


# -- the search on given features ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_search_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_subjects, dim = 60, 8
    centers = rng.normal(size=(n_subjects, dim))
    enrolled = rng.permutation(n_subjects)[:40]
    g_subj = np.repeat(enrolled, rng.integers(1, 3, len(enrolled)))  # some subjects hold two templates
    g_feat = centers[g_subj] + rng.normal(scale=0.8, size=(len(g_subj), dim))
    p_subj = rng.integers(0, n_subjects, 300)  # a third of the subjects are not enrolled
    p_feat = centers[p_subj] + rng.normal(scale=0.8, size=(len(p_subj), dim))
    g_feat /= np.linalg.norm(g_feat, axis=1, keepdims=True)
    p_feat /= np.linalg.norm(p_feat, axis=1, keepdims=True)
    got = ijb.evaluate_identification(p_feat, p_subj, g_feat, g_subj, FPIRS, RANKS)
    ref = _brute_force(list(zip(p_subj, p_feat)), list(zip(g_subj, g_feat)))
    assert 0 < ref[2] < 300 and ref[3] > 50
    _assert_matches(got, ref)
    assert 0 < got["tpir"][0.1] < 1 and 0 < got["rank"][1] < 1  # neither trivial case


def test_ties_count_against_the_mate():
    # Small integer features: every score is exact, so a mate and another subject really tie.
    gallery = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    g_subj = np.array([10, 11, 12, 13])
    probes = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [1.0, 2.0]])
    p_subj = np.array([10, 12, 99, 98, 97, 13])
    top, mate_score, mate_rank = ijb.search_gallery(probes, p_subj, gallery, g_subj)
    # probe 0 ties 10 and 11 and 13 (1.0 each): rank 3; probe 1 ties 12 and 13: rank 2; probe 5: 13 scores 3
    assert mate_rank.tolist() == [3, 2, 0, 0, 0, 1]
    np.testing.assert_array_equal(top, [1.0, 1.0, 2.0, 2.0, 1.0, 3.0])
    got = ijb.evaluate_identification(probes, p_subj, gallery, g_subj, FPIRS, RANKS)
    _assert_matches(got, _brute_force(list(zip(p_subj, probes)), list(zip(g_subj, gallery))))
    assert got["rank"][1] == pytest.approx(1 / 3)
    # non-mated tops 2, 2, 1: at FPIR 0.1 no non-mated probe may pass -> t = 2, and the one rank-1 mate scores 3
    assert got["threshold"][0.1] == 2.0 and got["fpir_reached"][0.1] == 0.0 and got["tpir"][0.1] == pytest.approx(1 / 3)


def test_threshold_reaches_the_fpir_exactly_and_det_agrees():
    top = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.95, 0.75, 0.65])
    mate_rank = np.array([0] * 10 + [1, 1, 2])
    mate_score = np.where(mate_rank > 0, top, np.nan)
    out = ijb.tpir_at_fpir(top, mate_score, mate_rank, (0.1, 0.3, 1.0))
    # 10 non-mated probes: one may pass at 0.1 (t = 0.8), three at 0.3 (t = 0.6), all at 1.0 (t = -inf)
    assert out[0.1] == (pytest.approx(1 / 3), 0.8, pytest.approx(0.1))  # only the 0.95 mate passes
    assert out[0.3] == (pytest.approx(2 / 3), 0.6, pytest.approx(0.3))
    assert out[1.0][1] == -np.inf and out[1.0][0] == pytest.approx(2 / 3)  # the rank-2 mate never counts
    fpir, fnir, thr = ijb.det_curve(top, mate_score, mate_rank)
    for f, (tpir, t, _) in out.items():
        i = int(np.flatnonzero(thr == t)[0])
        assert fnir[i] == pytest.approx(1 - tpir) and fpir[i] <= f
    assert np.all(np.diff(fpir) >= 0) and np.all(np.diff(fnir) <= 0)
    cmc = ijb.cmc_curve(mate_rank, 4)
    np.testing.assert_allclose(cmc, [2 / 3, 1.0, 1.0, 1.0])


def test_union_without_nonmated_probes_has_no_tpir():
    # IJB-C's own lists: every probe's subject is in G1 or G2, so the union is a closed-set search
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(12, 4))
    templates, medias = np.arange(12), np.arange(12)
    subjects = np.arange(12) % 6
    res = ijb.identification_1n(feats, templates, medias, {"G1": (templates[:3], subjects[:3]),
                                                            "G2": (templates[3:6], subjects[3:6])},
                                (templates[6:], subjects[6:]))
    assert res["G1"]["num_nonmated"] == 3 and res["G1+G2"]["num_nonmated"] == 0
    assert all(math.isnan(v) for v in res["G1+G2"]["tpir"].values()) and res["G1+G2"]["det"] is None
    assert not math.isnan(res["G1"]["tpir"][0.1])
    row = ijb.format_table_1n("m", res).splitlines()[3].split()
    assert row[:2] == ["m", "G1+G2"] and row[-2:] == ["-", "-"]


# -- the protocol on a synthetic IJB-layout set --------------------------------------------------------------
def _write_csv(path, rows, header="TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID"):
    path.write_text(header + "\n" + "".join(f"{t},{s},img/{t}_{i}.jpg,{i}\n" for i, (t, s) in enumerate(rows)))


def _layout(root, target="IJBC", seed=0, n_subjects=24, dim=12):
    """meta/ face list, two galleries of disjoint subjects, a probe list where some subjects are in neither
    gallery; one feature per face. Returns (root, feats, templates, medias, subject of each template)."""
    rng = np.random.default_rng(seed)
    low = target.lower()
    g1_name, g2_name = ("G1", "G2") if target == "IJBC" else ("S1", "S2")
    (root / "meta").mkdir(parents=True)
    centers = rng.normal(size=(n_subjects, dim))
    subjects = rng.permutation(np.arange(500, 500 + n_subjects))
    galleries = {g1_name: subjects[:9], g2_name: subjects[9:18]}  # the last 6 subjects are enrolled nowhere
    tid, mid = 1000, 1
    lines, feats, owner, g_rows, p_rows = [], [], {}, {g1_name: [], g2_name: []}, []
    for k, subject in enumerate(subjects):
        n_templates = 1 + rng.integers(1, 4) if k < 18 else rng.integers(1, 3)
        for j in range(n_templates):
            tid += int(rng.integers(1, 5))
            owner[tid] = subject
            for _ in range(rng.integers(1, 4)):
                mid += 1
                for _ in range(rng.integers(1, 3)):
                    lines.append(f"{len(lines)}.jpg {tid} {mid}")
                    feats.append(centers[k] + rng.normal(scale=0.9, size=dim))
            if j == 0 and k < 18:  # the first template of an enrolled subject is its gallery template
                g_rows[g1_name if k < 9 else g2_name] += [(tid, subject)] * 2
            else:
                p_rows += [(tid, subject)] * int(rng.integers(1, 3))  # one csv row per image
    (root / "meta" / f"{low}_face_tid_mid.txt").write_text("\n".join(lines) + "\n")
    for g, rows in g_rows.items():
        _write_csv(root / "meta" / f"{low}_1N_gallery_{g}.csv", rows)
    _write_csv(root / "meta" / f"{low}_1N_probe_mixed.csv", p_rows)
    templates = np.array([int(line.split()[1]) for line in lines])
    medias = np.array([int(line.split()[2]) for line in lines])
    return dict(root=root, feats=np.array(feats), templates=templates, medias=medias, owner=owner,
                galleries={g: [t for t, _ in rows[::2]] for g, rows in g_rows.items()},
                probes=sorted({t for t, _ in p_rows}), names=(g1_name, g2_name))


def _reference_1n(feats, templates, medias, galleries, probes, owner):
    pooled = _pool(feats, templates, medias, sorted(set(probes) | {t for ts in galleries.values() for t in ts}))
    probe_list = [(owner[t], pooled[t]) for t in probes]
    sets = {g: [(owner[t], pooled[t]) for t in ts] for g, ts in galleries.items()}
    sets["+".join(galleries)] = [x for g in galleries for x in sets[g]]
    return {g: _brute_force(probe_list, gallery) for g, gallery in sets.items()}


@pytest.mark.parametrize("target", ["IJBC", "IJBB"])
def test_protocol_matches_brute_force_on_given_features(tmp_path, target):
    s = _layout(tmp_path / target, target)
    low = target.lower()
    faces = dict(names=[f"{i}.jpg" for i in range(len(s["feats"]))], templates=s["templates"],
                 medias=s["medias"], feats=s["feats"], timings={}, use_detector_score=False,
                 use_norm_score=True, flip=True)
    res = ijb.evaluate_ijb_1n(None, str(s["root"]), target, str(tmp_path / "out"), name="given", faces=faces)
    ref = _reference_1n(s["feats"], s["templates"], s["medias"], s["galleries"], s["probes"], s["owner"])
    g1, g2 = s["names"]
    assert list(res["galleries"]) == [g1, g2, f"{g1}+{g2}"]
    for g, r in ref.items():
        _assert_matches(res["galleries"][g], r)
    # G1 and G2 hold disjoint subjects: a probe mated in one is non-mated in the other; the union sees the
    # six unenrolled subjects' probes as its only non-mated ones
    n_probes = len(s["probes"])
    assert res["num_probes"] == n_probes
    assert res["galleries"][g1]["num_mated"] + res["galleries"][g2]["num_mated"] == res["galleries"][f"{g1}+{g2}"]["num_mated"]
    assert res["galleries"][f"{g1}+{g2}"]["num_nonmated"] == sum(1 for t in s["probes"] if s["owner"][t] not in
                                                                   {s["owner"][u] for ts in s["galleries"].values()
                                                                    for u in ts})
    for g in (g1, g2):
        assert 0 < res["galleries"][g]["tpir"][0.1] < 1  # the synthetic features are informative, not perfect

    saved = json.loads((tmp_path / "out" / f"{low}_1n.json").read_text())
    assert saved["galleries"][g1]["rank"]["1"] == pytest.approx(ref[g1][0][1])
    assert saved["galleries"][g2]["tpir_at_fpir"]["1e-02"] == pytest.approx(ref[g2][1][0.01])
    for key in ("det_path", "cmc_path"):
        png = cv2.imread(res[key], cv2.IMREAD_UNCHANGED)
        assert png is not None and png.shape[0] > 100 and png.std() > 0
    assert os.path.basename(res["det_path"]) == f"{low}_1n_det.png"
    assert os.path.basename(res["cmc_path"]) == f"{low}_1n_cmc.png"
    lines = res["table"].splitlines()
    assert lines[0].split() == ["Methods", "rank-1", "rank-5", "rank-10", "TPIR@1e-02", "TPIR@1e-01"]
    row = lines[1].split()
    assert row[:2] == ["given", g1]
    assert [float(v) for v in row[2:]] == pytest.approx(
        [round(100 * ref[g1][0][k], 2) for k in RANKS] + [round(100 * ref[g1][1][f], 2) for f in FPIRS])


def test_subject_lists(tmp_path):
    p = tmp_path / "ijbc_1N_probe_mixed.csv"
    p.write_text("\ufeffTEMPLATE_ID,SUBJECT_ID,FILENAME\n7,3,img/1.jpg\n5,2,img/2.jpg\n7,3,frames/3.png\n\n")
    templates, subjects = ijb.read_template_subject_list(str(p))
    assert templates.tolist() == [5, 7] and subjects.tolist() == [2, 3]
    p.write_text("SUBJECT_ID,FILENAME,TEMPLATE_ID\n3,a.jpg,7\n")  # columns are found by name
    assert ijb.read_template_subject_list(str(p))[0].tolist() == [7]
    p.write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n7,3,a.jpg\n7,4,b.jpg\n")
    with pytest.raises(ijb.IJBFormatError, match=rf"{p}:3: template 7 is listed with subjects 3 and 4"):
        ijb.read_template_subject_list(str(p))
    p.write_text("TEMPLATE,SUBJECT,FILENAME\n7,3,a.jpg\n")
    with pytest.raises(ijb.IJBFormatError, match=rf"{p}: expected a header line naming TEMPLATE_ID and SUBJECT_ID"):
        ijb.read_template_subject_list(str(p))
    p.write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n7,x,a.jpg\n")
    with pytest.raises(ijb.IJBFormatError, match=rf"{p}:2: TEMPLATE_ID and SUBJECT_ID must be integers"):
        ijb.read_template_subject_list(str(p))
    with pytest.raises(FileNotFoundError, match="ijbc_1N_gallery_G1.csv"):
        ijb.read_template_subject_list(str(tmp_path / "ijbc_1N_gallery_G1.csv"))


def test_gallery_template_without_faces_names_the_list(tmp_path):
    s = _layout(tmp_path / "IJBC")
    g2 = s["root"] / "meta" / "ijbc_1N_gallery_G2.csv"
    g2.write_text(g2.read_text() + "424242,77,img/x.jpg,0\n")
    faces = dict(names=[str(i) for i in range(len(s["feats"]))], templates=s["templates"], medias=s["medias"],
                 feats=s["feats"], timings={}, use_detector_score=False, use_norm_score=True, flip=True)
    with pytest.raises(ijb.IJBFormatError, match=rf"{g2} names 1 templates without faces in .*ijbc_face_tid_mid.txt"
                                                 r", e.g. \[424242\]"):
        ijb.evaluate_ijb_1n(None, str(s["root"]), "IJBC", faces=faces)


# -- the command line ----------------------------------------------------------------------------------------
def _add_1n_lists(root):
    """Gallery and probe csv files for _make_fixture's set: subjects from the genuine pairs; the first template
    of the first four subjects forms G1, of the next four G2; the other templates are probes, so the last two
    subjects' probes are enrolled in neither gallery."""
    pairs = np.loadtxt(root / "meta" / "ijbc_template_pair_label.txt", dtype=int)
    owner = {}
    for t in np.unique(pairs[:, :2]):
        same = pairs[(pairs[:, 2] == 1) & ((pairs[:, 0] == t) | (pairs[:, 1] == t))][:, :2]
        owner[int(t)] = int(min([t, *same.reshape(-1)]))
    subjects = sorted(set(owner.values()))
    first = {s: min(t for t in owner if owner[t] == s) for s in subjects}
    g1 = [(first[s], s) for s in subjects[:4]]
    g2 = [(first[s], s) for s in subjects[4:8]]
    probes = [(t, owner[t]) for t in sorted(owner) if t not in first.values()]
    _write_csv(root / "meta" / "ijbc_1N_gallery_G1.csv", g1)
    _write_csv(root / "meta" / "ijbc_1N_gallery_G2.csv", g2)
    _write_csv(root / "meta" / "ijbc_1N_probe_mixed.csv", probes)
    return owner, {"G1": [t for t, _ in g1], "G2": [t for t, _ in g2]}, [t for t, _ in probes]


@pytest.mark.parametrize("mode", ["1:N", "both"])
def test_cli_1n_with_a_checkpoint(tmp_path, capsys, mode):
    root = _make_fixture(tmp_path / "IJBC", n_ids=10, templates_per_id=2, seed=3)
    owner, galleries, probes = _add_1n_lists(root)
    if mode == "1:N":  # identification does not read the pair list
        (root / "meta" / "ijbc_template_pair_label.txt").unlink()
    torch.manual_seed(0)
    model = get_model("small", num_features=16, dropout=0.0, fp16=False).eval()
    ckpt = tmp_path / "model.pt"
    torch.save(model.state_dict(), ckpt)
    out_dir = tmp_path / "res"
    res = ijb.main(["--model", str(ckpt), "--network", "small", "--embedding-size", "16", "--image-path", str(root),
                    "--target", "IJBC", "--result-dir", str(out_dir), "--batch-size", "32", "--workers", "0",
                    "--device", "cpu", "--mode", mode])
    out = capsys.readouterr().out
    one_n = res["1:N"] if mode == "both" else res
    if mode == "both":
        assert "1e-06" in out and os.path.isfile(res["1:1"]["roc_path"])
    feats, templates, medias = _independent_face_features(root, "IJBC", model, False)
    ref = _reference_1n(feats, templates, medias, galleries, probes, owner)
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("Methods") and "rank-1" in line)
    assert lines[head].split() == ["Methods", "rank-1", "rank-5", "rank-10", "TPIR@1e-02", "TPIR@1e-01"]
    for line, g in zip(lines[head + 1:head + 4], ("G1", "G2", "G1+G2")):
        rank, tpir = ref[g][0], ref[g][1]
        assert line.split()[:2] == ["model", g]
        want = [f"{100 * rank[k]:.2f}" for k in RANKS] + ["-" if math.isnan(tpir[f]) else f"{100 * tpir[f]:.2f}"
                                                          for f in FPIRS]
        assert line.split()[2:] == want
        _assert_matches(one_n["galleries"][g], ref[g])
    for name in ("ijbc_1n_det.png", "ijbc_1n_cmc.png"):
        png = cv2.imread(str(out_dir / name), cv2.IMREAD_UNCHANGED)
        assert png is not None and png.shape[0] > 100 and png.std() > 0
    saved = json.loads((out_dir / "ijbc_1n.json").read_text())
    assert saved["galleries"]["G1+G2"]["num_mated_probes"] == ref["G1+G2"][2]
    assert str(out_dir / "ijbc_1n_det.png") in out and str(out_dir / "ijbc_1n_cmc.png") in out


@pytest.mark.parametrize("case", ["missing gallery", "missing probe list", "no subject column"])
def test_cli_1n_bad_lists_are_one_error_line(tmp_path, capsys, case):
    root = _make_fixture(tmp_path / "IJBC", n_ids=10, templates_per_id=2, seed=4)
    _add_1n_lists(root)
    meta = root / "meta"
    if case == "missing gallery":
        (meta / "ijbc_1N_gallery_G2.csv").unlink()
        words = [str(meta), "lacks ijbc_1N_gallery_G2.csv"]
    elif case == "missing probe list":
        (meta / "ijbc_1N_probe_mixed.csv").unlink()
        words = [str(meta), "lacks ijbc_1N_probe_mixed.csv"]
    else:
        (meta / "ijbc_1N_gallery_G1.csv").write_text("TEMPLATE_ID,FILENAME\n101,a.jpg\n")
        words = [str(meta / "ijbc_1N_gallery_G1.csv"), "expected a header line naming TEMPLATE_ID and SUBJECT_ID"]
    # a model file that does not exist: the lists are checked before the model is loaded
    with pytest.raises(SystemExit) as exc:
        ijb.main(["--model", str(tmp_path / "absent.pt"), "--image-path", str(root), "--mode", "1:N",
                  "--workers", "0", "--device", "cpu"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    for w in words:
        assert w in err
