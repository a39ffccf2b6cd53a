"""The objective registry: every objective's trainer is a class of its own, named in its family module and guarded."""

from __future__ import annotations

from helpers import built_trainer, write_jsonl, write_tiny_recipe

from llmtune.training import GuardedTrainerMixin

PAIRS = [{"prompt": f"Say {w}", "chosen": w, "rejected": w.upper()} for w in ("one", "two", "three", "four")]


def test_each_objective_trains_with_a_named_guarded_class_of_its_family(tmp_path):
    write_jsonl(tmp_path / "data" / "pairs.jsonl", PAIRS)
    pairs = {"train": "data/pairs.jsonl", "format": "preference", "max_length": 64, "eval_split": 0.0}
    classes = {"sft": type(built_trainer(write_tiny_recipe(tmp_path, "sft")))}
    for name in ("dpo", "kto", "orpo"):
        path = write_tiny_recipe(tmp_path, name, objective={"name": name}, data=pairs)
        classes[name] = type(built_trainer(path))
    for name, cls in classes.items():
        assert issubclass(cls, GuardedTrainerMixin), name
        assert cls.__module__.startswith("llmtune.objectives."), (name, cls.__module__)
        # A class made at run time by type() would not be found under its name in its module.
        assert getattr(__import__(cls.__module__, fromlist=[cls.__name__]), cls.__name__) is cls, name
    assert len({cls.__name__ for cls in classes.values()}) == len(classes), classes
