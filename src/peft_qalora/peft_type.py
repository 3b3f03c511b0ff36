# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The ``QALORA`` member of PEFT's ``PeftType`` enum, added at import time.

PEFT dispatches every API (``get_peft_model``, ``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained``,
saving) on ``PeftType``. A third-party method needs a member of that enum before it can call
``peft.utils.register_peft_method``; Python enums have no public way to grow, so this adds one the way the
enum machinery itself stores members. Importing this module twice (or reloading it) adds nothing twice.
"""

from __future__ import annotations

from peft.utils import PeftType


def _extend_peft_type(name: str) -> PeftType:
    existing = PeftType.__members__.get(name)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


QALORA: PeftType = _extend_peft_type("QALORA")
