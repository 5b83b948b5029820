"""checkpoint/mcore.py: resolving --load. The latest-iteration pointer is validated, not trusted."""
from __future__ import annotations

import pytest

from llamapro_megatron.checkpoint.mcore import LATEST_FILE, resolve_checkpoint
from llamapro_megatron.errors import UserError


@pytest.mark.parametrize("tag", ["../../etc", "iter_0000001", "1e3", "-1", "７"])
def test_a_pointer_that_is_not_an_iteration_is_refused(tmp_path, tag):
    (tmp_path / LATEST_FILE).write_text(tag)
    with pytest.raises(UserError, match="must hold 'release' or an iteration number"):
        resolve_checkpoint(tmp_path)


def test_a_pointer_to_a_missing_iteration_is_refused(tmp_path):
    (tmp_path / LATEST_FILE).write_text("3\n")
    with pytest.raises(UserError, match="iter_0000003 has no llamapro.json"):
        resolve_checkpoint(tmp_path)
