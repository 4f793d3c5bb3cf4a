"""The "FTN" PEFT type.

PEFT's `register_peft_method` only accepts members of its fixed `PeftType` enum and has no plugin discovery. A
`str`-mixin enum member compares and hashes like the plain string "FTN", so configs read back from JSON
(where peft_type is the string "FTN") find the same table entries, while code that reads `.value` still works.
"""

import enum


class FTNPeftType(str, enum.Enum):
    FTN = "FTN"


FTN_PEFT_TYPE = FTNPeftType.FTN
PREFIX = "ftn_"
