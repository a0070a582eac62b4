"""An instance process's side: its entry point, the loaded model, the compute loop and its batchers, the
replies, and the backends that adapt each engine library."""
