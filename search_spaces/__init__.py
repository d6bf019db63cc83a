"""Search spaces (the Net2Net action space) and the benchmarks' base networks."""

from growth.search_spaces.space import Layer, SearchSpace, SpaceSpec, arch_string, make_space

__all__ = ["Layer", "SearchSpace", "SpaceSpec", "arch_string", "make_space"]
