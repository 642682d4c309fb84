"""Decisions of the Slicer panels, in classes and functions that need neither qt, nor torch, nor numpy at import.

The module files (``TCURLoRASegment.py``, ``TCURLoRATrain.py``) draw widgets and call these with plain values or
MRML nodes; everything here is tested with pytest, on real MRML nodes from the ``slicer-core`` wheel where nodes are
involved. One module a concern:

- :mod:`.settings`: device choices, value ranges and the training defaults the Train panel starts from;
- :mod:`.arguments`: the CLI calls the panels start;
- :mod:`.adapters`: adapter combo-box entries and tooltips, kept equal to the parameter that runs;
- :mod:`.engine`: the panels' one door into the engine (adapter store, base model, labels, import checks);
- :mod:`.nodes`: descriptions of volume and segmentation nodes;
- :mod:`.caselist`: the Train panel's case list and segment-to-label table;
- :mod:`.export`: training cases written as files and the case list the CLI reads;
- :mod:`.tracking`: progress events as text, training curves and their chart nodes;
- :mod:`.runs`: a segmentation or training run from the scene's nodes to a background job and back;
- :mod:`.view`: which buttons are enabled and what they say;
- :mod:`.requirements`: dependency checks, the torch constraint for pip, the interpreter for jobs;
- :mod:`.selftest`: the Slicer self-tests' runner, which reports a skipped test as skipped, not failed.

Nothing is imported here, so that a module file imports exactly the submodules it uses.
"""
