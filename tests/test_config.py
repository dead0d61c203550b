"""Config files, BASE inheritance and overrides; errors name the key and where it came from."""
import glob
import os
import re

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
                   "BASE: ['base.yaml']\nMODEL:\n  NAME: custom\n  DROP_RATE: 0\nTRAIN:\n"
                   "  BASE_LR: 1e-3\n")
    cfg = load_config(child, ["DATA.IMG_SIZE", "448", "MODEL.MGSSAF.DEPTHS", "[1, 1, 2, 1]"])
    assert cfg.MODEL.NUM_CLASSES == 10
    assert cfg.MODEL.DROP_RATE == 0.0 and isinstance(cfg.MODEL.DROP_RATE, float)
    assert cfg.TRAIN.BASE_LR == 1e-3
    assert cfg.DATA.IMG_SIZE == 448
    assert cfg.MODEL.MGSSAF.DEPTHS == [1, 1, 2, 1]
    assert cfg.is_frozen()


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = _write(tmp_path / "bad.yaml", "MODEL:\n  MGSSAF:\n    EMBED_DIMS: 96\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key MODEL\.MGSSAF\.EMBED_DIMS"):
        load_config(path)


def test_a_key_given_twice_in_a_file_is_an_error_naming_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys: a second TRAIN block would drop the first."""
    path = _write(tmp_path / "twice.yaml", "TRAIN:\n  EPOCHS: 2\nDATA:\n  BATCH_SIZE: 8\n"
                                          "TRAIN:\n  WARMUP_EPOCHS: 0\n")
    with pytest.raises(ConfigError, match=re.escape(
            f"{path}: key TRAIN is given twice (lines 1 and 5): the second would replace the "
            "first; merge them")):
        load_config(path)
    path = _write(tmp_path / "nested.yaml", "TRAIN:\n  EPOCHS: 2\n  EPOCHS: 3\n")
    with pytest.raises(ConfigError, match=r"key TRAIN\.EPOCHS is given twice \(lines 2 and 3\)"):
        load_config(path)
    path = _write(tmp_path / "listkey.yaml", "? [a, b]\n: 1\n")  # a key YAML cannot use
    with pytest.raises(ConfigError, match=r"(?s)listkey\.yaml: not valid YAML: .*unhashable"):
        load_config(path)
    # YAML merge keys ('<<') may repeat a key on purpose: the explicit one wins
    import yaml
    from config import _ConfigLoader
    merged = yaml.load("a: &a {EPOCHS: 2, WARMUP_EPOCHS: 1}\nb:\n  <<: *a\n  EPOCHS: 5\n",
                       Loader=_ConfigLoader)
    assert merged["b"] == {"EPOCHS": 5, "WARMUP_EPOCHS": 1}


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


@pytest.mark.parametrize("key, value, message", [
    ("DATA.BATCH_SIZE", "0", "DATA.BATCH_SIZE (--opts) must be at least 1, got 0"),
    ("DATA.NUM_WORKERS", "-1", "DATA.NUM_WORKERS (--opts) must be 0 or more, got -1"),
    ("TRAIN.EPOCHS", "0", "TRAIN.EPOCHS (--opts) must be at least 1, got 0"),
    ("TRAIN.ACCUMULATION_STEPS", "0", "TRAIN.ACCUMULATION_STEPS (--opts) must be at least 1"),
    ("TRAIN.KEEP_CHECKPOINTS", "-1", "TRAIN.KEEP_CHECKPOINTS (--opts) must be 0 (keep all)"),
    ("TRAIN.LAYER_DECAY", "1.5", "TRAIN.LAYER_DECAY (--opts) must be in (0, 1] (1 switches"),
    ("MODEL_EMA_DECAY", "0.0", "MODEL_EMA_DECAY (--opts) must be in (0, 1), got 0.0"),
    ("AMP_DTYPE", "fp16", "AMP_DTYPE (--opts) must be one of 'float16', 'bfloat16', got 'fp16'"),
    ("DEVICE", "gpu", "DEVICE (--opts) must be one of 'auto', 'cuda', 'cpu', got 'gpu'"),
    ("SAVE_FREQ", "0", "SAVE_FREQ (--opts) must be at least 1, got 0"),
    ("PRINT_FREQ", "0", "PRINT_FREQ (--opts) must be at least 1, got 0"),
    ("DIST_TIMEOUT", "0", "DIST_TIMEOUT (--opts) must be at least 1, got 0"),
    ("DATA.IMG_SIZE", "100", "DATA.IMG_SIZE (--opts) must be a multiple of 32 (the network's "
     "stride), got 100"),
    ("SEG.CROP_SIZE", "[48, 64]", "SEG.CROP_SIZE (--opts) must be a multiple of 32 (the "
     "network's stride) (each item), got [48, 64]"),
])
def test_single_key_values_are_refused_naming_key_source_value_and_allowed(key, value, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load_config(None, [key, value])


def test_a_value_from_a_flag_names_the_flag():
    with pytest.raises(ConfigError, match=re.escape("DATA.BATCH_SIZE (--batch-size) must be at "
                                                    "least 1, got 0")):
        load_config(None, flags={"DATA.BATCH_SIZE": 0})
    with pytest.raises(ConfigError, match=re.escape("DATA.IMG_SIZE (command line) must be")):
        load_config(None, flags={"DATA.IMG_SIZE": 0})  # no flag sets it


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nowhere.yaml"):
        load_config("nowhere.yaml")


RELEASED = {"T": ([2, 2, 6, 2], 96, 0.2), "S": ([2, 2, 18, 2], 96, 0.2),
            "B": ([2, 2, 18, 2], 128, 0.3)}


def test_every_shipped_config_has_a_run_folder_of_its_own():
    """No two shipped configs share output/<MODEL.NAME>/<tag> (auto-resume would take up the
    other run's checkpoints); the ADE20K configs build their ImageNet config's backbone."""
    paths = sorted(glob.glob("configs/**/*.yaml", recursive=True))
    names = {path: load_config(path).MODEL.NAME for path in paths}
    assert len(paths) >= 11 and len(set(names.values())) == len(paths), names
    for variant, size in (("T", "t"), ("S", "s"), ("B", "b")):
        seg = load_config(f"configs/seg/upernet_mg_ssaf_{size}_512x512_160k_ade20k.yaml")
        imagenet = load_config(f"configs/MG-SSAF/MG-SSAF-{variant}.yaml")
        assert seg.MODEL.MGSSAF == imagenet.MODEL.MGSSAF, variant


@pytest.mark.parametrize("variant", list(RELEASED))
def test_released_repository_config_files_build_their_variant(reference_dir, variant):
    """The released repository's own YAML files, as they are (MODEL.NAME MG-SSAF-S etc.)."""
    path = os.path.join(reference_dir, "released-configs", f"MG-SSAF-{variant}.yaml")
    cfg = load_config(path)
    depths, embed, drop_path = RELEASED[variant]
    assert cfg.MODEL.NAME == f"MG-SSAF-{variant}"  # the user's spelling is kept
    assert (cfg.MODEL.MGSSAF.DEPTHS, cfg.MODEL.MGSSAF.EMBED_DIM) == (depths, embed)
    assert cfg.MODEL.DROP_PATH_RATE == drop_path
    shipped = load_config(f"configs/MG-SSAF/MG-SSAF-{variant}.yaml")
    assert cfg.MODEL.MGSSAF == shipped.MODEL.MGSSAF
    assert load_config(path, ["MODEL.DROP_PATH_RATE", "0.1"]).MODEL.DROP_PATH_RATE == 0.1
    assert load_config(None, ["MODEL.NAME", cfg.MODEL.NAME]).MODEL.DROP_PATH_RATE == drop_path
    from config import get_config
    from config import parse_option
    args = parse_option(["--cfg", path, "--output", "out", "--tag", "run"])
    assert get_config(args).OUTPUT == os.path.join("out", f"MG-SSAF-{variant}", "run")
    # A key the variant does not have is an error naming the released spelling and the value.
    with pytest.raises(ConfigError, match=rf"MODEL\.NAME MG-SSAF-{variant} \(.*MG-SSAF-{variant}"
                                          rf"\.yaml\) names MG-SSAF-{variant}, but "
                                          r"MODEL\.MGSSAF\.EMBED_DIM is 64 \(--opts\)"):
        load_config(path, ["MODEL.MGSSAF.EMBED_DIM", "64"])


@pytest.mark.parametrize("spelling", ["MG-SSAF-s", "mg-ssaf-s", "mg_ssaf_s", "MGSSAF_S",
                                      "MG_SSAF_SMALL"])
def test_near_miss_of_a_variant_name_is_an_error_naming_the_spellings(spelling):
    with pytest.raises(ConfigError, match=rf"MODEL\.NAME '{spelling}' \(--opts\) is not a "
                                          r"variant's name: write mg_ssaf_small or MG-SSAF-S"):
        load_config(None, ["MODEL.NAME", spelling])


def test_variant_name_with_another_architecture_names_both(tmp_path):
    path = _write(tmp_path / "b.yaml", "MODEL:\n  NAME: mg_ssaf_base\n  MGSSAF:\n"
                                       "    EMBED_DIM: 96\n")
    with pytest.raises(ConfigError, match=r"MODEL\.NAME mg_ssaf_base \(.*b\.yaml\) names "
                                          r"MG-SSAF-B, but MODEL\.MGSSAF\.EMBED_DIM is 96 "
                                          r"\(.*b\.yaml\) where MG-SSAF-B has 128"):
        load_config(path)
    # The shipped T file applied to the name of S: DEPTHS differ.
    with pytest.raises(ConfigError, match=r"names MG-SSAF-S, but MODEL\.MGSSAF\.DEPTHS is "
                                          r"\[2, 2, 6, 2\] \(.*MG-SSAF-T\.yaml\)"):
        load_config("configs/MG-SSAF/MG-SSAF-T.yaml", ["MODEL.NAME", "mg_ssaf_small"])
    # Another name is a network of one's own.
    assert load_config(path, ["MODEL.NAME", "mine"]).MODEL.MGSSAF.EMBED_DIM == 96


# None in --opts is None, as yacs reads it; Python literals as yacs reads them.
def test_opts_none_and_python_literals():
    cfg = load_config(None, ["AUG.CUTMIX_MINMAX", "None", "TRAIN.OPTIMIZER.BETAS", "(0.9, 0.95)",
                             "TRAIN.AUTO_RESUME", "False", "AMP_ENABLE", "false",
                             "MODEL.PRETRAINED", "null", "AUG.AUTO_AUGMENT", "none"])
    assert cfg.AUG.CUTMIX_MINMAX is None and cfg.TRAIN.OPTIMIZER.BETAS == [0.9, 0.95]
    assert cfg.TRAIN.AUTO_RESUME is False and cfg.AMP_ENABLE is False
    assert cfg.MODEL.PRETRAINED is None
    assert cfg.AUG.AUTO_AUGMENT == "none"
    assert load_config(None, ["AUG.CUTMIX_MINMAX", "[0.2, 0.8]"]).AUG.CUTMIX_MINMAX == [0.2, 0.8]
    with pytest.raises(ConfigError, match=r"--opts: config key TRAIN\.EPOCHS expects an integer, "
                                          r"got None"):
        load_config(None, ["TRAIN.EPOCHS", "None"])


# Swin's keys are accepted; those without effect here are named.
def test_swin_keys_accepted_and_inert_ones_named(tmp_path):
    from config import inert_settings
    path = _write(tmp_path / "swin.yaml", """DATA:
  ZIP_MODE: true
  CACHE_MODE: full
  MASK_PATCH_SIZE: 32
  MASK_RATIO: 0.6
TRAIN:
  LR_SCHEDULER: {NAME: multistep, MULTISTEPS: [30, 60], GAMMA: 0.5}
  OPTIMIZER: {NAME: sgd, EPS: 1.0e-8, BETAS: [0.9, 0.999], MOMENTUM: 0.9}
TEST: {CROP: true, SEQUENTIAL: true, SHUFFLE: false}
AMP_OPT_LEVEL: O1
FUSED_WINDOW_PROCESS: true
FUSED_LAYERNORM: false
""")
    cfg = load_config(path)
    assert cfg.TRAIN.LR_SCHEDULER.GAMMA == 0.5 and cfg.AMP_ENABLE
    assert inert_settings(cfg) == ["DATA.ZIP_MODE True (--zip)",
                                   "DATA.CACHE_MODE 'full' (--cache-mode)",
                                   "TEST.SEQUENTIAL True", "FUSED_WINDOW_PROCESS True "
                                   "(--fused_window_process)", "AMP_OPT_LEVEL 'O1' "
                                   "(--amp-opt-level)"]
    o0 = load_config(path, ["AMP_OPT_LEVEL", "O0"])
    assert not o0.AMP_ENABLE and "AMP_OPT_LEVEL" not in " ".join(inert_settings(o0))
    with pytest.raises(ConfigError, match="AMP_OPT_LEVEL .* must be O0, O1 or O2, got 'O3'"):
        load_config(path, ["AMP_OPT_LEVEL", "O3"])
