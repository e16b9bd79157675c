"""Datasets: the registry of datasets and their files (``registry``), pickle-free readers
(``formats``), verified downloads (``downloads``), preparation into safetensors shards and a
manifest (``prepare``), verified loading of the prepared splits (``splits``), the on-device batch
pipeline (``pipeline``) and the fixed few-shot episodes (``episodes``)."""
