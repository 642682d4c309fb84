"""Cohorts of brain cases for benchmarks and demos, built from templates and atlases fetched at run time.

Not part of the engine (nothing under ``TCURLoRALib`` imports this) and not collected by pytest (no ``test_`` file
here). Entry points, run from the repository root::

    python -m Testing.cohorts.build --task tissue --out /tmp/cohort-tissue
    python -m Testing.cohorts.make_sample

Modules: :mod:`.augment` (random deformation and intensity changes), :mod:`.synthseg` (T1-like images from label
maps), :mod:`.sources` (fetching and reading the source anatomies), :mod:`.splits` (which source goes to which
split), :mod:`.build` (the cohort command). See ``README.md`` here for sources, splits and licences.
"""
