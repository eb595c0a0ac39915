"""What the trainer registers, as plain data for the light SDK: losses (with the data shapes each
trains on and its call form), miners, and model families (the content kinds each embeds, and the
names ``get_model(select_model=...)`` takes).

Generated from trainer/finetuner_trainer (losses.py, families/) by `python -m finetuner.api.crdgen`;
`--check` fails when it differs from the trainer's registries. Do not edit.
"""

from __future__ import annotations

from typing import Any

LOSSES: dict[str, dict[str, Any]] = {
    'AngularLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'ArcFaceLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'CircleLoss': {
        'shapes': ('labelled', 'pairs', 'tuples'),
        'objective': 'label',
    },
    'ContrastiveLoss': {
        'shapes': ('labelled', 'pairs', 'tuples'),
        'objective': 'label',
    },
    'CosFaceLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'DynamicSoftMarginLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'FastAPLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'GeneralizedLiftedStructureLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'HistogramLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'InstanceLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'IntraPairVarianceLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'LargeMarginSoftmaxLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'LiftedStructureLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'MarginLoss': {
        'shapes': ('labelled', 'pairs', 'tuples'),
        'objective': 'label',
    },
    'MultiSimilarityLoss': {
        'shapes': ('labelled', 'pairs', 'tuples'),
        'objective': 'label',
    },
    'NCALoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'NPairsLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'NTXentLoss': {
        'shapes': ('labelled', 'pairs', 'tuples'),
        'objective': 'label',
    },
    'NormalizedSoftmaxLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'P2SGradLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'PNPLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'ProxyAnchorLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'ProxyNCALoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'RankedListLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'SignalToNoiseRatioContrastiveLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'SmoothAPLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'SoftTripleLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'SphereFaceLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'SubCenterArcFaceLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'SupConLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'ThresholdConsistentMarginLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'TripletMarginLoss': {
        'shapes': ('labelled', 'pairs', 'tuples'),
        'objective': 'label',
    },
    'TupletMarginLoss': {
        'shapes': ('labelled', 'pairs'),
        'objective': 'label',
    },
    'CLIPLoss': {
        'shapes': ('text-image',),
        'objective': 'pair',
    },
    'MultipleNegativesRankingLoss': {
        'shapes': ('pairs', 'scored-pairs', 'tuples'),
        'objective': 'pair',
    },
    'CosineSimilarityLoss': {
        'shapes': ('scored-pairs',),
        'objective': 'pair',
    },
    'MarginMSELoss': {
        'shapes': ('scored-pairs', 'scored-tuples'),
        'objective': 'pair',
    },
    'CachedMultipleNegativesRankingLoss': {
        'shapes': ('pairs', 'scored-pairs'),
        'objective': 'pair',
    },
    'CachedCLIPLoss': {
        'shapes': ('text-image',),
        'objective': 'pair',
    },
}

MINERS: tuple[str, ...] = (
    'AngularMiner',
    'BatchEasyHardMiner',
    'BatchHardMiner',
    'DistanceWeightedMiner',
    'HDCMiner',
    'MultiSimilarityMiner',
    'PairMarginMiner',
    'TripletMarginMiner',
    'UniformHistogramMiner',
)

FAMILIES: dict[str, dict[str, Any]] = {
    'clip': {
        'kinds': ('text', 'image'),
        'select_models': {
            'clip-text': 'text',
            'clip-vision': 'image',
        },
    },
    'text': {
        'kinds': ('text',),
        'select_models': {},
    },
    'timm': {
        'kinds': ('image', 'tensor'),
        'select_models': {},
    },
}
