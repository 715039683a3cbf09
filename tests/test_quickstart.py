"""The quickstart is the main job: PEFT must learn, close to full fine-tuning, for a fraction of the bytes."""

import json

from fedpeft_hpc.quickstart import run_quickstart


def test_quickstart_shows_peft_working(tmp_path, pretrained_ckpt, capsys):
    rc = run_quickstart(out=str(tmp_path), methods="full,head,bias,adapter,prompt,lora",
                        overrides=[f"model.checkpoint={pretrained_ckpt}", "run.progress=false"])
    assert rc == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "quickstart.json").read_text())}
    full = rows["full"]
    assert full["final_acc"] > 0.8
    for m in ("bias", "adapter", "prompt", "lora"):
        r = rows[m]
        assert r["final_acc"] > 0.5, (m, r["final_acc"])  # chance is 0.1
        assert r["final_acc"] >= full["final_acc"] - 0.05, (m, r["final_acc"], full["final_acc"])
        assert r["bytes_total"] < 0.1 * full["bytes_total"]
    table = capsys.readouterr().out
    assert "| bias" in table and "MB sent" in table
    assert (tmp_path / "quickstart.md").read_text().strip() in table
