"""Engines behind one small interface (base.py): transformers, llama.cpp, sentence-transformers."""
