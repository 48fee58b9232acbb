"""The spec (one source of truth for a chain and its options) and the planner."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from iopipe import Pipeline
from iopipe.pipeline.plan import plan
from iopipe.pipeline.schema import OPTIONS
from iopipe.pipeline.spec import Options, PipelineSpec


def test_options_are_the_constructors_keywords_with_its_defaults() -> None:
    params = inspect.signature(Pipeline.__init__).parameters
    keywords = {k: p.default for k, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert keywords == Options.defaults()


def test_the_config_table_takes_exactly_the_options() -> None:
    assert set(OPTIONS) == set(Options.defaults())


def test_options_are_checked_once_at_creation_and_frozen() -> None:
    with pytest.raises(ValueError, match="handoff must be an int >= 1"):
        Options(handoff=0)
    with pytest.raises(TypeError, match="fuse must be True or False"):
        Options(fuse=1)  # type: ignore[arg-type]
    opts = Options(timeout=3.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.timeout = 4.0  # type: ignore[misc]
    assert opts.as_dict()["timeout"] == 3.0


def test_chaining_makes_a_new_spec_and_keeps_the_options() -> None:
    base = Pipeline.from_iterable(range(10), timeout=7.0, handoff=3)
    chained = base.map(lambda x: x).map(lambda x: x + 1).batch(2, collate_fn=list)
    assert chained._spec.options == base._spec.options
    assert chained._spec.options.handoff == 3
    assert base._spec.stages == ()
    assert [s.name for s in chained._spec.stages] == ["map", "map_1", "batch"]
    assert chained._spec.group_size == 2
    with chained:
        assert list(chained) == [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]


def test_then_renames_a_taken_name() -> None:
    spec = Pipeline.from_iterable(range(3)).map(lambda x: x, name="f")._spec
    stage = Pipeline.from_iterable(range(3)).map(lambda x: x, name="f")._spec.stages[0]
    out = spec.then(stage)
    assert isinstance(out, PipelineSpec)
    assert [s.name for s in out.stages] == ["f", "f_1"]
    assert [s.name for s in spec.stages] == ["f"]


def test_the_planner_opens_nothing_and_copies_the_chain() -> None:
    pipe = (
        Pipeline.from_iterable(range(8), on_error="skip", max_inflight_bytes=1 << 20)
        .map(lambda x: x)
        .to_device("cpu")  # does nothing: left out of the plan
        .batch(4)
    )
    p = plan(pipe._spec)
    assert [s.kind for s in p.stages] == ["map", "batch"]
    assert all(a is not b for a, b in zip(p.stages, pipe._spec.stages, strict=False))
    assert p.source is not pipe._spec.source
    assert all(s.limiter is None for s in p.stages)  # nothing opened
    assert p.policy is not None
    assert all(s.policy is p.policy for s in p.stages)
    assert p.fuse is False  # skipping happens stage by stage
    assert p.max_inflight_bytes == 1 << 20
    assert plan(Pipeline.from_iterable(range(3)).map(lambda x: x)._spec).fuse is True


def test_an_option_switched_off_round_trips_through_a_config() -> None:
    pipe = Pipeline.from_iterable([1, 2, 3], stall_warning=None)
    config = pipe.to_config()
    assert config["options"] == {"stall_warning": False}
    again = Pipeline.from_config(config)
    assert again._spec.options.stall_warning is None
    assert Pipeline.from_config(pipe.to_config())._spec.options == pipe._spec.options
