"""ops.evaluate: the (members x crops) error table against an independent computation.

The expected figures come from the tars read directly (tarfile), ``preprocess_images`` (Pillow) and
the members run by hand; the table comes from the DALI eval pipelines through
``evaluate_multicrop`` / ``python -m ops.evaluate_cli``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from ops.evaluate import EvalTable, binomial_stderr, correct_counts, evaluate_multicrop
from ops.evaluate_cli import main, parse_members, parse_subset
from pipeline.config import DataConfig
from pipeline.multicrop import preprocess_images
from tests.ops.conftest import IMAGE_SIZE, VAL_RESIZE, members_of, read_split

DATA = {"image_size": IMAGE_SIZE, "val_resize": VAL_RESIZE, "normalization": "imagenet"}


# DALI (libjpeg-turbo + its resize) and Pillow differ by about one grey level per pixel, which moves
# these members' crop-averaged log-probabilities by up to ~0.1 (measured: 0.015-0.11); an image whose
# label sits within TIE (in log-probability) of a decision boundary may land on either side.
TIE = 0.15
MAX_NEAR_TIES = 4  # of 16 images: beyond that the check would say little


@dataclass
class Expected:
    top1: float
    top5: float
    near_top1: int  # images within TIE of flipping their top-1 outcome
    near_top5: int


def independent_errors(members, images, labels, crops, counts) -> dict[tuple[int, int], Expected]:
    """Errors per (k, crops) computed image by image, without ops.evaluate or the loaders."""
    cfg = DataConfig(**DATA)
    labels = torch.tensor(labels)
    out = {}
    for c in crops:
        x = preprocess_images(images, c, cfg)  # [N*c, 3, S, S]
        with torch.no_grad():
            per_member = [torch.softmax(m(x), dim=1).view(len(images), c, -1).mean(dim=1) for m in members]
        for k in counts:
            ens = sum(per_member[:k]) / k  # [N, C]
            logp = ens.log()
            p_label = logp.gather(1, labels[:, None])[:, 0]
            others = logp.scatter(1, labels[:, None], -float("inf")).sort(dim=1, descending=True).values
            top1 = (p_label > others[:, 0]).float()
            top5 = (p_label > others[:, 4]).float()
            near1 = int(((p_label - others[:, 0]).abs() < TIE).sum())
            near5 = int(((p_label - others[:, 4]).abs() < TIE).sum())
            out[(k, c)] = Expected(1 - top1.mean().item(), 1 - top5.mean().item(), near1, near5)
    return out


def assert_matches(table, expected, n, max_near_ties=MAX_NEAR_TIES):
    for cell in table.top1:
        want = expected[cell]
        assert want.near_top1 <= max_near_ties and want.near_top5 <= max_near_ties, (
            f"{cell}: too many near-ties for a meaningful check"
        )
        assert abs(table.top1[cell] - want.top1) * n <= want.near_top1 + 1e-6, (cell, table.top1[cell], want)
        assert abs(table.top5[cell] - want.top5) * n <= want.near_top5 + 1e-6, (cell, table.top5[cell], want)


@pytest.fixture(scope="module")
def expected(checkpoints, synthetic_shards):
    images, labels = read_split(synthetic_shards)
    return independent_errors(members_of(checkpoints), images, labels, (1, 10), (1, 2, 3))


def test_correct_counts_by_hand():
    # 2 members, 3 images, 6 classes; labels 0, 1, 5
    p1 = torch.tensor(
        [[0.5, 0.1, 0.1, 0.1, 0.1, 0.1], [0.6, 0.0, 0.1, 0.1, 0.1, 0.1], [0.3, 0.3, 0.2, 0.1, 0.1, 0.0]]
    )
    p2 = torch.tensor(
        [[0.2, 0.4, 0.1, 0.1, 0.1, 0.1], [0.0, 0.9, 0.0, 0.0, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]]
    )
    top1, top5 = correct_counts(torch.stack([p1, p2]), torch.tensor([0, 1, 5]), (1, 2))
    # member 1 alone: image 0 right; images 1 and 2 rank their label 6th of 6 -> top-1 and top-5 misses
    assert (top1[1], top5[1]) == (1, 1)
    # both: means [0.35, 0.25, ..], [0.3, 0.45, .., 0.1], [.., 0.5] -> all three right
    assert (top1[2], top5[2]) == (3, 3)


def test_table_matches_independent_computation(checkpoints, synthetic_shards, expected):
    table = evaluate_multicrop(
        members_of(checkpoints), str(synthetic_shards), data=DATA, crops=(1, 10), progress=False
    )
    assert isinstance(table, EvalTable)
    assert table.num_samples == 16 and table.member_counts == (1, 2, 3) and table.crops == (1, 10)
    assert_matches(table, expected, 16)
    assert 0 < table.top5[(1, 1)] < table.top1[(1, 1)] < 1  # neither figure is degenerate
    md = table.to_markdown()
    assert md.splitlines()[0].startswith("| members | 1 crop top-1 / top-5 (%) | 10 crops")
    se1 = 100 * (table.top1[(3, 1)] * (1 - table.top1[(3, 1)]) / 16) ** 0.5  # binomial, by hand
    se5 = 100 * (table.top5[(3, 1)] * (1 - table.top5[(3, 1)]) / 16) ** 0.5
    assert (
        f"| 3 | {100 * table.top1[(3, 1)]:.2f} ± {se1:.2f} / {100 * table.top5[(3, 1)]:.2f} ± {se5:.2f} |"
        in md
    )
    # per-image hits back every cell, and the paired differences are listed under the table
    for cell, hits in table.hits.items():
        assert hits.shape == (16,) and abs(1 - hits.double().mean().item() - table.top1[cell]) < 1e-12
    diffs = table.differences()
    assert [(d.a, d.b) for d in diffs] == [
        ((1, 10), (1, 1)),
        ((2, 10), (2, 1)),
        ((3, 10), (3, 1)),
        ((2, 1), (1, 1)),
        ((3, 1), (1, 1)),
        ((2, 10), (1, 10)),
        ((3, 10), (1, 10)),
    ]
    for d in diffs:
        assert d.n == 16 and abs(d.diff - (table.top1[d.a] - table.top1[d.b])) < 1e-12
        assert d.describe() in md
    assert sorted(table.metrics()) == sorted(
        f"top{t}_error{se}_m{k}_c{c}"
        for t, se in ((1, ""), (5, ""), (1, "_se"))
        for k in (1, 2, 3)
        for c in (1, 10)
    )


def test_cli_prints_and_logs_to_mlflow(
    tmp_path, checkpoints, synthetic_shards, expected, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # MLflow puts a sqlite store's artifacts under ./mlruns
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(
        [
            "--model",
            *map(str, checkpoints[:2]),
            "--shards",
            str(synthetic_shards),
            "--crops",
            "1",
            "--members",
            "1..2",
            "--tracking-uri",
            uri,
            "--no-progress",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "| 2 |" in out and "16 images" in out
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("inception-evaluate").experiment_id])
    logged = EvalTable(
        (1, 2),
        (1,),
        {(k, 1): run.data.metrics[f"top1_error_m{k}_c1"] for k in (1, 2)},
        {(k, 1): run.data.metrics[f"top5_error_m{k}_c1"] for k in (1, 2)},
        16,
    )
    assert_matches(logged, expected, 16)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "multicrop_table.md",
        "multicrop_error.png",
    }
    from pipeline.schema import manifest_sha256

    assert run.data.tags["eval.shards_sha256"] == manifest_sha256(synthetic_shards)
    (dataset,) = client.get_run(run.info.run_id).inputs.dataset_inputs  # MLflow's "Datasets"
    assert dataset.dataset.name == f"{synthetic_shards.name}/val"
    assert dataset.dataset.digest == manifest_sha256(synthetic_shards)[:36]
    assert [(t.key, t.value) for t in dataset.tags] == [("mlflow.data.context", "evaluation")]


def test_cli_bad_input_is_one_clear_line(tmp_path, checkpoints, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(checkpoints[0]), "--shards", str(tmp_path), "--crops", "1,7"])
    assert exc.value.code == 2 and "each must be one of 1, 10, 144" in capsys.readouterr().err
    assert main(["--model", str(checkpoints[0]), "--shards", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist; build it with `build-shards`" in err
    assert parse_members("1..4") == [1, 2, 3, 4] and parse_members("1,3") == [1, 3]


def test_cli_bad_device_and_batch_size_are_one_line(tmp_path, checkpoints, synthetic_shards, capsys):
    """Before: ``--device cuda`` on a CPU machine was a traceback; ``--batch-size 0`` was accepted."""
    common = ["--model", str(checkpoints[0]), "--shards", str(synthetic_shards), "--no-progress"]
    for bad in ("0", "-4"):
        with pytest.raises(SystemExit) as exc:
            main([*common, "--batch-size", bad])
        assert exc.value.code == 2 and "is not a whole number >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*common, "--device", "cuda"]) == 1
        err = capsys.readouterr().err
        assert (
            err
            == "inception-evaluate: error: --device cuda: this machine has no CUDA GPU; use --device cpu\n"
        )


def test_cli_refuses_shards_that_differ_from_their_manifest(tmp_path, checkpoints, synthetic_shards, capsys):
    """Before: labels rewritten inside a tar were evaluated and logged with the genuine manifest's hash."""
    from tests.ops.conftest import doctored_copy

    doctored = doctored_copy(synthetic_shards, tmp_path / "doctored", manifest_too=False)
    assert main(["--model", str(checkpoints[0]), "--shards", str(doctored), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "val-000000.tar: sha256 differs from the manifest" in err


def test_paired_difference_and_standard_errors_by_hand():
    # 4 images; cell (1, 10) misses images 2 and 3, cell (1, 1) misses images 1, 2 and 3
    hits = {(1, 1): torch.tensor([1, 0, 0, 0], dtype=torch.bool), (1, 10): torch.tensor([1, 1, 0, 0]).bool()}
    table = EvalTable((1,), (1, 10), {(1, 1): 0.75, (1, 10): 0.5}, {(1, 1): 0.0, (1, 10): 0.0}, 4, {}, hits)
    (d,) = table.differences()
    # per-image error differences (10 minus 1 crop): [0, -1, 0, 0]: mean -0.25, variance 0.1875
    assert d.diff == -0.25 and abs(d.stderr - (0.1875 / 4) ** 0.5) < 1e-12 and not d.significant
    assert d.describe() == "1 member: 10 vs 1 crop: -25.00 ± 21.65 points on 4 images (within noise)"
    assert abs(table.stderr((1, 1)) - (0.75 * 0.25 / 4) ** 0.5) < 1e-12
    assert binomial_stderr(0.4, 1000) == (0.24 / 1000) ** 0.5  # ~1.5 points on 1,000 images
    # 100 images, the second cell right on 30 more of them: far beyond two standard errors
    a = torch.zeros(100, dtype=torch.bool)
    b = torch.arange(100) < 30
    big = EvalTable(
        (1, 2), (1,), {(1, 1): 1.0, (2, 1): 0.7}, {(1, 1): 0, (2, 1): 0}, 100, {}, {(1, 1): a, (2, 1): b}
    )
    (d,) = big.differences()
    assert d.a == (2, 1) and d.b == (1, 1) and abs(d.diff + 0.3) < 1e-12 and d.significant
    assert "1 crop: 2 vs 1 member: -30.00" in big.to_markdown() and "(beyond 2 SE)" in big.to_markdown()


def test_crop_setting_on_a_subset_uses_the_first_images(checkpoints, synthetic_shards):
    members = members_of(checkpoints[:2])
    full = evaluate_multicrop(members, str(synthetic_shards), data=DATA, crops=(1, 10), progress=False)
    part = evaluate_multicrop(
        members, str(synthetic_shards), data=DATA, crops=(1, 10), progress=False, max_images={10: 5}
    )
    assert part.num_samples == 16 and part.samples == {10: 5} and part.images(10) == 5
    assert part.images(1) == 16 and part.hits[(2, 10)].shape == (5,)
    for k in (1, 2):
        assert torch.equal(part.hits[(k, 10)], full.hits[(k, 10)][:5])  # the same 5 images, same outcome
        assert part.top1[(k, 10)] == 1 - full.hits[(k, 10)][:5].double().mean().item()
        assert torch.equal(part.hits[(k, 1)], full.hits[(k, 1)])
    # paired with 1 crop on the 5 images both settings saw
    d = part.difference((1, 10), (1, 1))
    assert d.n == 5
    md = part.to_markdown()
    assert "16 images; 10 crops on the first 5 of them" in md and "on 5 images" in md
    assert parse_subset("144=200") == (144, 200)
    for bad in ("144", "7=10", "144=0", "a=b"):
        with pytest.raises(Exception, match="--subset"):
            parse_subset(bad)


def test_member_count_beyond_members_is_refused(checkpoints, synthetic_shards):
    with pytest.raises(ValueError, match=r"outside 1..2"):
        evaluate_multicrop(members_of(checkpoints[:2]), str(synthetic_shards), data=DATA, member_counts=(3,))


@pytest.mark.slow
def test_144_crops_match_independent_computation(checkpoints, synthetic_shards):
    images, labels = read_split(synthetic_shards)
    members = members_of(checkpoints)
    want = independent_errors(members, images, labels, (144,), (1, 3))
    table = evaluate_multicrop(
        members,
        str(synthetic_shards),
        data=DATA,
        crops=(144,),
        member_counts=(1, 3),
        batch_size=4,
        progress=False,
    )
    assert_matches(table, want, 16)


@pytest.mark.realdata
def test_real_imagenet_images_match_independent_computation(tmp_path, real_data_dir):
    """16 real ImageNet images (one per class, full size, via build-shards) through the DALI pipelines."""
    import tarfile

    from pipeline.shards import build_shards
    from tests.ops.conftest import make_checkpoint

    names = []
    with tarfile.open(real_data_dir / "imagenet-sample-images.tar") as tar:
        for member in tar:
            if member.name.endswith(".JPEG") and len(names) < 16:
                synset = member.name.split("/")[-1].split("_")[0]
                (tmp_path / "src" / synset).mkdir(parents=True)
                (tmp_path / "src" / synset / "0.jpg").write_bytes(tar.extractfile(member).read())
                names.append(synset)
    build_shards(
        tmp_path / "src", tmp_path / "shards", split="val", format="imagefolder", shard_size=6, progress=False
    )
    images, labels = read_split(tmp_path / "shards")
    calibration = preprocess_images(images, 1, DataConfig(**DATA))
    classes = sorted(names)
    checkpoints = [
        make_checkpoint(tmp_path / f"m{i}", seed=i, class_names=classes, calibration=calibration)
        for i in range(2)
    ]
    members = members_of(checkpoints)
    want = independent_errors(members, images, labels, (1, 10), (1, 2))
    table = evaluate_multicrop(members, str(tmp_path / "shards"), data=DATA, crops=(1, 10), progress=False)
    assert table.num_samples == 16
    # 16 classes crowd the top-5 boundary of these untrained members: up to 6 near-ties (measured 5)
    assert_matches(table, want, 16, max_near_ties=6)


def test_cli_without_tracking_prints_the_table_and_logs_nothing(
    tmp_path, checkpoints, synthetic_shards, capsys, monkeypatch
):
    """Before: `--tracking-uri none` evaluated, printed the table, then crashed in MLflow with a
    traceback; for a models:/ URI it named no way out."""
    monkeypatch.chdir(tmp_path)
    common = [
        "--model",
        str(checkpoints[0]),
        "--shards",
        str(synthetic_shards),
        "--crops",
        "1",
        "--no-progress",
    ]
    assert main([*common, "--tracking-uri", "none"]) == 0
    out = capsys.readouterr().out
    assert "| 1 |" in out and "logged to" not in out
    assert main([*common, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-log"]) == 0
    assert "logged to" not in capsys.readouterr().out and not (tmp_path / "mlflow.db").exists()
    # a registered version needs its registry: said before any work (the shard folder is not even read)
    assert (
        main(
            ["--model", "models:/x@champion", "--shards", str(tmp_path / "nowhere"), "--tracking-uri", "none"]
        )
        == 1
    )
    assert capsys.readouterr().err == (
        "inception-evaluate: error: models:/x@champion is loaded from an MLflow registry: give "
        "--tracking-uri URI (or set MLFLOW_TRACKING_URI); add --no-log to print the table without "
        "logging it\n"
    )
