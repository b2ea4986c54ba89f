"""Readers and writers of each on-disk format; :mod:`torchkeep.formats.detect` tells them apart."""
