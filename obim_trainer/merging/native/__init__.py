"""The native merge loops: ``fused_take.cpp`` and how it is compiled (:mod:`.build`, also used by ``setup.py``)."""
