"""Config files, BASE inheritance and overrides; errors name the key and where it came from."""
import pytest

from config import ConfigError, load_config


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_variant_files_write_out_the_architecture():
    expected = {
        "T": (96, [2, 2, 6, 2], [3, 6, 12, 24], [0.0, 0.5, 0.5, 0.0], 0.2),
        "S": (96, [2, 2, 18, 2], [3, 6, 12, 24], [0.0, 0.5, 0.5, 0.0], 0.2),
        "B": (128, [2, 2, 18, 2], [4, 8, 16, 32], [0.0, 0.75, 0.75, 0.0], 0.3),
    }
    for variant, (embed, depths, heads, ratio, dpr) in expected.items():
        path = f"configs/MG-SSAF/MG-SSAF-{variant}.yaml"
        text = open(path).read()
        for key in ("EMBED_DIM", "DEPTHS", "NUM_HEADS", "GLOBAL_RATIO", "STRIP_WIDTH",
                    "WINDOW_SIZE", "MLP_RATIO", "QKV_BIAS", "DROP_PATH_RATE"):
            assert key in text, (path, key)
        cfg = load_config(path)
        arch = cfg.MODEL.MGSSAF
        assert (arch.EMBED_DIM, arch.DEPTHS, arch.NUM_HEADS, arch.GLOBAL_RATIO,
                cfg.MODEL.DROP_PATH_RATE) == (embed, depths, heads, ratio, dpr)
        assert (arch.STRIP_WIDTH, arch.WINDOW_SIZE, arch.MLP_RATIO, arch.QKV_BIAS) == (
            [0, 2, 2, 0], 7, 2.0, True)


def test_base_inheritance_and_opts(tmp_path):
    base = _write(tmp_path / "base.yaml", "MODEL:\n  NUM_CLASSES: 10\n  DROP_RATE: 0.1\n")
    child = _write(tmp_path / "child.yaml",
                   "BASE: ['base.yaml']\nMODEL:\n  DROP_RATE: 0\nTRAIN:\n  BASE_LR: 1e-3\n")
    cfg = load_config(child, ["DATA.IMG_SIZE", "448", "MODEL.MGSSAF.DEPTHS", "[1, 1, 2, 1]"])
    assert cfg.MODEL.NUM_CLASSES == 10
    assert cfg.MODEL.DROP_RATE == 0.0 and isinstance(cfg.MODEL.DROP_RATE, float)
    assert cfg.TRAIN.BASE_LR == 1e-3
    assert cfg.DATA.IMG_SIZE == 448
    assert cfg.MODEL.MGSSAF.DEPTHS == [1, 1, 2, 1]
    assert cfg.is_frozen()
    assert base


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = _write(tmp_path / "bad.yaml", "MODEL:\n  MGSSAF:\n    EMBED_DIMS: 96\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key MODEL\.MGSSAF\.EMBED_DIMS"):
        load_config(path)


def test_wrong_type_in_file_names_key_and_file(tmp_path):
    path = _write(tmp_path / "bad.yaml", "MODEL:\n  MGSSAF:\n    DEPTHS: [2, two, 6, 2]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: config key MODEL\.MGSSAF\.DEPTHS\[1\] "
                                          r"expects an integer"):
        load_config(path)


def test_bad_opts():
    with pytest.raises(ConfigError, match=r"--opts: unknown config key TRAIN\.EPOCH"):
        load_config(None, ["TRAIN.EPOCH", "3"])
    with pytest.raises(ConfigError, match=r"--opts: config key DATA\.IMG_SIZE expects an integer"):
        load_config(None, ["DATA.IMG_SIZE", "large"])
    with pytest.raises(ConfigError, match="KEY VALUE pairs"):
        load_config(None, ["DATA.IMG_SIZE"])


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nowhere.yaml"):
        load_config("nowhere.yaml")
