import pytest

from nabla.config import SparsityConfig, load_config
from wan.defaults import CONFIG_DIR, find_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_full_file(tmp_path):
    assert SparsityConfig().mode == "full"
    cfg = load_config(write(tmp_path, """
sparsity:
  mode: nabla+sta
  threshold: 0.6
  sta_window: [11, 3, 3]
  dense_steps: 2
  block_size: 128
  max_density: 0.2
  min_density: 0.05
"""))
    assert cfg == SparsityConfig("nabla+sta", 0.6, (11, 3, 3), False, 2, 128, 0.05, 0.2)
    assert cfg.uses_nabla and cfg.uses_sta and cfg.is_sparse
    assert (cfg.backend, cfg.dense_above) == ("auto", "auto")
    assert cfg.query_block_size is None and cfg.query_merge == 1
    assert SparsityConfig(block_size=64, query_block_size=128).query_merge == 2


def test_other_sections_are_allowed_only_when_named(tmp_path):
    path = write(tmp_path, "sparsity: {mode: sta}\ngeneration: {steps: 3}\n")
    assert load_config(path, other_sections=("generation",)).mode == "sta"
    with pytest.raises(ValueError, match="unknown top-level key 'generation'"):
        load_config(path)


BAD = [
    ("sparsity: {mod: nabla}", "unknown key 'sparsity.mod'"),
    ("sparsity: {mode: sparse}", "'mode': 'sparse'; allowed: one of full, nabla, sta, nabla\\+sta"),
    ("sparsity: {threshold: 0}", "'threshold': 0; allowed: a number in \\(0, 1\\]"),
    ("sparsity: {threshold: 1.5}", "'threshold': 1.5"),
    ("sparsity: {threshold: high}", "'threshold': 'high'"),
    ("sparsity: {threshold: true}", "'threshold': True"),
    ("sparsity: {sta_window: [10, 3, 3]}", "'sta_window': \\[10, 3, 3\\]; allowed: three odd positive"),
    ("sparsity: {sta_window: [11, 3]}", "'sta_window'"),
    ("sparsity: {sta_window: [11, -3, 3]}", "'sta_window'"),
    ("sparsity: {sta_window: 3}", "'sta_window': 3"),
    ("sparsity: {dense_steps: -1}", "'dense_steps': -1; allowed: an integer >= 0"),
    ("sparsity: {dense_steps: 1.5}", "'dense_steps': 1.5"),
    ("sparsity: {block_size: 96}", "'block_size': 96; allowed: one of 64, 128"),
    ("sparsity: {max_density: 0}", "'max_density': 0; allowed: a number in \\(0, 1\\] or null"),
    ("sparsity: {min_density: 1.2}", "'min_density': 1.2"),
    ("sparsity: {min_density: 0.5, max_density: 0.2}", "'min_density': 0.5; allowed: a number <= max_density"),
    ("sparsity: {sta_shift_at_border: 1}", "'sta_shift_at_border': 1"),
    ("sparsity: {backend: cuda}", "'backend': 'cuda'; allowed: auto, triton, flash"),
    ("sparsity: {dense_above: 0}", "'dense_above': 0; allowed: \"auto\" or a number in \\(0, 1\\]"),
    ("sparsity: {dense_above: always}", "'dense_above': 'always'"),
    ("sparsity: {block_size: 128, query_block_size: 64}", "'query_block_size': 64; allowed: null or one of 128 \\(>= block_size\\)"),
    ("sparsity: {query_block_size: 96}", "'query_block_size': 96; allowed: null or one of 64, 128"),
    ("sparsity: {query_block_size: true}", "'query_block_size': True"),
    ("sparsity: [1, 2]", "'sparsity' must be a mapping"),
    ("- a\n- b", "must hold a mapping at the top level"),
    ("sparsity: {mode: [", ("c.yaml is not valid YAML at line 1, column 19: expected the node content, but found "
                           "'<stream end>' \\(while parsing a flow node\\)")),
    ("sparsity:\n  mode: nabla\n\tthreshold: 0.5", ("c.yaml is not valid YAML at line 3, column 1: found character "
                                                   "'\\\\t' that cannot start any token")),
    ("sparsity: {mode: nabla\x00}", ("c.yaml is not a text file \\(character #x0000 at offset 22\\); a config is a YAML "
                                   "text file")),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_config_gives_one_line_error(tmp_path, text, message):
    with pytest.raises(ValueError, match=message) as err:
        load_config(write(tmp_path, text))
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_binary_file_is_named_as_not_text(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"sparsity: {}\n\x89PNG")
    with pytest.raises(ValueError, match="^config: .*c.yaml is not a text file \\(byte 0x89 at offset 13 is not "
                       "UTF-8\\); a config is a YAML text file$"):
        load_config(path)


def test_shipped_configs_are_found_by_name(tmp_path, monkeypatch):
    assert find_config("nabla-0.7-fast") == find_config("nabla-0.7-fast.yaml") == CONFIG_DIR / "nabla-0.7-fast.yaml"
    assert load_config(find_config("nabla-0.7-fast")).max_density == 0.1
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nabla-0.7-fast").write_text("sparsity: {mode: sta}\n")  # a file of that name wins
    assert find_config("nabla-0.7-fast") == tmp_path.joinpath("nabla-0.7-fast").relative_to(tmp_path)
    with pytest.raises(ValueError, match="^config: 'nabla-9' is neither a file nor a shipped config; shipped: "
                       "fastest, fastest-60, fewstep-4, finetune-full, finetune-lora, finetune-tiny, full, kandinsky5-fast, kandinsky5-trained, nabla-0.4, .*, sta-11-3-3$"):
        find_config("nabla-9")
    with pytest.raises(ValueError, match="^config: file not found: sub/nabla-0.7.yaml; or give a shipped config"):
        find_config("sub/nabla-0.7.yaml")  # a path means that file, not the shipped one of its name
