"""experiments/resolution_study.py: its settings become the run flags, and its table renders
every row, a failed one included (the study itself is measured, not tested: README)."""
from experiments import resolution_study as rs


def test_settings_become_flags():
    assert rs.setting_flags("768") == ["--image-size", "768"]
    assert rs.setting_flags("1024/t256") == ["--image-size", "1024", "--tile", "256", "--tile-overlap", "32"]
    for s in rs.SETTINGS:  # every setting parses as the run's flags
        from pn_jax import cli

        argv = ["--dataset", "synthetic"] + rs.setting_flags(s)
        cfg = cli.build_config(cli.build_run_parser().parse_args(argv))
        assert cfg.data.image_size == int(s.split("/")[0]) and cfg.data.tile == (256 if "/t" in s else 0)


def test_table_renders_rows_and_failures():
    m = {"mAUROC_sp_max": 91.25, "mAUROC_px": None, "mAUPRO_px": float("nan")}
    row = {"dataset": "texture", "setting": "512/t256", "n_train": 10, "n_test": 12, "patches_per_image": 9216,
           "metrics": {"default": m, "patchcore": m}, "wall_s": 44.0, "load": 3.2, "peak_rss_gb": 1.9}
    doc = {"cpu": "CPU X (2 cores; avx2)", "max_memory_gb": 8.0, "tile_overlap": 32,
           "rows": [row, {"dataset": "pattern", "setting": "1024", "error": "Traceback\nMemoryBudgetError: no"}]}
    text = rs.table(doc)
    assert "CPU X (2 cores; avx2)" in text
    assert "| texture | 512/t256 | 10 / 12 | 9216 | 91.2 / - / - | 91.2 / - / - | 2.00 | 3 | 1.90 |" in text
    assert "| pattern | 1024 | failed: MemoryBudgetError: no" in text
