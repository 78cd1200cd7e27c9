"""Only what pyproject.toml cannot say: build the shared-memory ring through cffi."""

from setuptools import setup

setup(cffi_modules=["meshproxy/_shm_build.py:ffibuilder"])
