"""offload_traffic: the bytes an offloaded base moves per micro-step, against the planner's own weight sizes."""
import pytest

from qlora_kit import plan_memory
from qlora_kit.planning.offload import offload_traffic, read_bandwidth

BIG = dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
           num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


def test_cpu_mode_copies_the_4bit_weights_once_per_forward_pass():
    w4 = plan_memory(BIG, compute_dtype="fp32").rows[0].bytes  # all 80 layers' 4-bit weights
    with_ckpt = offload_traffic(BIG, "cpu", grad_checkpointing=True, compute_dtype="fp32")
    without = offload_traffic(BIG, "cpu", grad_checkpointing=False, compute_dtype="fp32")
    assert with_ckpt.streamed_bytes == pytest.approx(w4)
    assert with_ckpt.moved_bytes == pytest.approx(2 * w4) and without.moved_bytes == pytest.approx(w4)
    assert with_ckpt.seconds is None


def test_disk_mode_reads_what_the_page_cache_cannot_hold_twice_per_step():
    w4 = plan_memory(BIG, compute_dtype="bf16").rows[0].bytes
    head = 2 * 128256 * 8192
    cold = offload_traffic(BIG, "disk", compute_dtype="bf16", cache_bytes=0, bandwidth=2e9)
    assert cold.streamed_bytes == pytest.approx(w4 + head)
    assert cold.file_bytes == pytest.approx(w4 + 2 * head + 2 * (2 * 80 + 1) * 8192)
    assert cold.moved_bytes == pytest.approx(2 * (w4 + head))
    assert cold.seconds == pytest.approx(cold.moved_bytes / 2e9)
    part = offload_traffic(BIG, "disk", compute_dtype="bf16", cache_bytes=20e9, bandwidth=2e9)
    assert part.moved_bytes == pytest.approx(2 * (w4 + head - 20e9))
    assert cold.first_step_bytes == pytest.approx(2 * (w4 + head))  # cold: forward reads all, backward all again
    assert part.first_step_bytes == pytest.approx(2 * (w4 + head) - 20e9)  # backward finds the forward's tail
    assert part.slowdown(100.0) == pytest.approx((100.0 + part.seconds) / 100.0)
    assert offload_traffic(BIG, "disk", cache_bytes=1e12).moved_bytes == 0
    assert "GB moved per micro-step" in str(part)
    with pytest.raises(ValueError, match="offload mode"):
        offload_traffic(BIG, "gpu")


def test_read_bandwidth_reads_the_file(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"\1" * (4 << 20))
    assert read_bandwidth(f, chunk=1 << 20) > 0


def test_cli_plan_prints_the_offload_traffic(capsys):
    from qlora_kit.cli import main

    code = main(["plan", "--model", "llama-3.1-70b", "--seq-len", "256", "--device", "cpu", "--device-memory", "24GB",
                 "--compute-dtype", "fp32", "--optimizer", "adamw", "--offload", "disk", "--bandwidth", "1.5"])
    out = capsys.readouterr().out
    assert code == 0 and "disk-offloaded: 2 of 80 layers resident" in out
    assert "offload=disk:" in out and "at 1.50 GB/s that adds" in out
