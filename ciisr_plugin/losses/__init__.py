from ciisr_plugin._autoimport import import_modules

# Register every `*_loss.py` module of this folder, as BasicSR does for its own.
_modules = import_modules(__name__, __path__, '_loss')
