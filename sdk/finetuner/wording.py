"""A run's messages in the words of whoever called ``fit()``.

The trainer and the operator name a field as the FinetuneRun writes it (``spec.batchSize``,
``spec.trainData[3]``, ``spec.modelOptions.pooler``): the custom resource is what a person using kubectl
wrote. Someone who called ``finetuner.fit(batch_size=...)`` wrote ``batch_size``; the SDK shows them
the same message with the argument's name (``batch_size``, ``train_data[3]``, ``model_options.pooler``,
``callbacks[1].caption``). Records are counted from 0 on both sides.
"""

from __future__ import annotations

import re

SPEC_PATH = re.compile(r'\bspec\.([a-z][A-Za-z0-9]*)((?:\[\d+\]|\.[A-Za-z_][A-Za-z0-9_]*)*)')


def for_sdk(text: str | None) -> str | None:
    """``text`` with every ``spec.<field path>`` as the fit() argument it came from, and the spec's other
    camelCase names (``numItemsPerClass``) as fit() spells them."""
    if not text:
        return text
    from finetuner.fitting import snake_case_words  # the contract's names -> fit()'s, generated from it

    arguments = _arguments()

    def replace(match: re.Match[str]) -> str:
        field, rest = match.group(1), match.group(2)
        argument = arguments.get(field, field)
        if argument == 'callbacks':
            rest = re.sub(r'^(\[\d+\])\.options\.', r'\1.', rest)
        return argument + re.sub(r'\.([a-z]+(?:[A-Z][a-z0-9]*)+)', lambda m: '.' + _snake(m.group(1)), rest)

    return snake_case_words(SPEC_PATH.sub(replace, text))


def _snake(name: str) -> str:
    return re.sub(r'(?<!^)([A-Z])', r'_\1', name).lower()


def _arguments() -> dict[str, str]:
    """Spec field (camelCase, as the custom resource names it) -> the fit() argument that sets it."""
    from finetuner.api.v1alpha1 import FinetuneRunSpec
    from finetuner.fitting import SDK_ARGUMENTS

    own = {sdk.spec_field: name for name, sdk in SDK_ARGUMENTS.items() if sdk.spec_field}
    return {info.alias or name: own.get(name, name) for name, info in FinetuneRunSpec.model_fields.items()}
