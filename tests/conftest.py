import os
import sys

# tests/ on sys.path so test modules can import the shared synthetic-trace helper.
sys.path.insert(0, os.path.dirname(__file__))
