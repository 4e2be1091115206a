"""The elastic run's set-up checks: the settings it refuses and the per-rank batch it derives."""
import pytest

from partialfc.config import ConfigError, default_config
from partialfc.engine.elastic import check_elastic_config, per_rank_batch


def test_per_rank_batch_keeps_the_global_batch():
    assert per_rank_batch(24, 1, "step_2") == 24
    assert per_rank_batch(24, 3, "step_2") == 8


def test_per_rank_batch_that_does_not_divide_names_the_values_and_the_fits():
    with pytest.raises(ConfigError) as err:
        per_rank_batch(24, 5, "work_dirs/x/step_10")
    msg = str(err.value)
    assert "global batch 24 (work_dirs/x/step_10)" in msg and "over 5 ranks" in msg
    assert "(1, 2, 3, 4, 6, 8, 12, 24)" in msg


def test_elastic_needs_save_every_and_refuses_overwrite():
    config = default_config()
    config.elastic = True
    config.save_every = None
    with pytest.raises(ConfigError, match="elastic=True needs save_every"):
        check_elastic_config(config)
    config.save_every = 10
    check_elastic_config(config)
    config.overwrite = True
    with pytest.raises(ConfigError, match="elastic=True with overwrite=True"):
        check_elastic_config(config)
    config.elastic = False
    check_elastic_config(config)  # without elastic nothing is asked
