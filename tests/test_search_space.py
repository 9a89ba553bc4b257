"""Search-space YAML validation: clear errors naming the file and the field."""

import pytest

from raymtl.errors import ConfigError
from raymtl.search_space import bundled_search_space, load_search_space
from raymtl.weighting import WEIGHTINGS

ALLOWED = {
    "lr": "log_float",
    "weight_decay": "log_float",
    "weighting": "categorical",
    "batch_size": "int",
}
REGISTRIES = {"weighting": WEIGHTINGS}


def _load(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return load_search_space(path, ALLOWED, REGISTRIES)


def test_bundled_victim_spaces_are_valid():
    for name in ("victim", "victim_all_weightings"):
        space = load_search_space(bundled_search_space(name), ALLOWED, REGISTRIES)
        assert space.defaults()["weighting"] == "ls"
    full = load_search_space(bundled_search_space("victim_all_weightings"), ALLOWED, REGISTRIES)
    assert set(full.parameters["weighting"].choices) == set(WEIGHTINGS.names())


def test_a_valid_space_parses_every_type(tmp_path):
    space = _load(
        tmp_path,
        "lr: {type: log_float, low: 1.0e-4, high: 1.0e-2, default: 1.0e-3}\n"
        "batch_size: {type: int, low: 32, high: 256}\n"
        "weighting: {type: categorical, choices: [ls, uw]}\n",
    )
    assert space.defaults() == {"lr": 1e-3, "batch_size": 32, "weighting": "ls"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr: [unclosed\n", "not valid YAML at line"),
        ("- just a list\n", "expected a mapping"),
        (
            "momentum: {type: float, low: 0, high: 1}\n",
            "unknown parameter 'momentum'; this study searches",
        ),
        ("lr: {type: log_float, low: 0.1, high: 0.01}\n", "lr.low must be < lr.high"),
        ("lr: {type: log_float, low: 0, high: 0.01}\n", "lr.low must be > 0 for log_float"),
        ("lr: {type: gaussian, low: 0, high: 1}\n", "lr.type must be one of"),
        ("lr: {type: log_float, low: 1.0e-4}\n", "lr.high is missing"),
        ("lr: {type: log_float, low: 1.0e-4, high: 1.0e-2, step: 2}\n", "unknown key(s) step"),
        (
            "lr: {type: log_float, low: 1.0e-4, high: 1.0e-2, default: 1}\n",
            "lr.default 1.0 is outside",
        ),
        (
            "weighting: {type: categorical, choices: [ls, nash]}\n",
            "choice 'nash' is not a known weighting strategy",
        ),
        (
            "weighting: {type: categorical, choices: []}\n",
            "weighting.choices must be a non-empty list",
        ),
        ("batch_size: {type: categorical, choices: [32]}\n", "batch_size must be of type int"),
    ],
)
def test_bad_spaces_name_the_file_and_the_field(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text)
    assert message in str(err.value)
    assert "space.yaml" in str(err.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_search_space(tmp_path / "nope.yaml", ALLOWED)


def test_every_study_has_a_valid_bundled_space_and_rejects_foreign_parameters(tmp_path):
    import raymtl.tune.studies  # noqa: F401  (registers the studies)
    from raymtl.tune.study import STUDIES

    for name in STUDIES.names():
        study = STUDIES.create(name)
        space = load_search_space(bundled_search_space(name), study.parameters, study.registries)
        assert set(space.parameters) <= set(study.parameters)
    mtlue = STUDIES.create("mtlue")
    assert mtlue.metrics == ("test/mean_score", "epsilon_255") and mtlue.modes == ("min", "min")
    bad = tmp_path / "mtlue.yaml"
    bad.write_text("base: {type: categorical, choices: [em, lsp2]}\n")
    with pytest.raises(ConfigError, match="base choice 'lsp2' is not a known base method"):
        load_search_space(bad, mtlue.parameters, mtlue.registries)
    unlearn = STUDIES.create("unlearn")
    bad.write_text("weighting: {type: categorical, choices: [ls]}\n")
    with pytest.raises(ConfigError, match="unknown parameter 'weighting'"):
        load_search_space(bad, unlearn.parameters, unlearn.registries)
