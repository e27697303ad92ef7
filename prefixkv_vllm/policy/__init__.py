"""The PrefixKV method as pure math: no vLLM import anywhere below this package."""

from .allocation import Allocator, PrefixSearchAllocator, ProfileAllocator, UniformAllocator
from .costs import CRITERIA, allocate_by_cost
from .curves import importance_curves, prefix_counts, search_prefix_config
from .policies import POLICY_NAMES, KVPolicy, build_policy
from .profile import ModelIdentity, Profile, ProfileError, average_keep_ratios
from .scorers import SCORERS, MeanScorer, RawScorer, RecencyScorer, Scorer, SnapKVScorer, WindowScorer, make_scorer
from .selection import Protection, clamp_keep_counts, select_tokens

__all__ = [
    "Allocator", "PrefixSearchAllocator", "ProfileAllocator", "UniformAllocator",
    "CRITERIA", "allocate_by_cost",
    "importance_curves", "prefix_counts", "search_prefix_config",
    "POLICY_NAMES", "KVPolicy", "build_policy",
    "ModelIdentity", "Profile", "ProfileError", "average_keep_ratios",
    "SCORERS", "MeanScorer", "RawScorer", "RecencyScorer", "Scorer", "SnapKVScorer", "WindowScorer", "make_scorer",
    "Protection", "clamp_keep_counts", "select_tokens",
]
