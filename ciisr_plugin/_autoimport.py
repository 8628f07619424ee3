"""Import every module of a package whose file name ends with a suffix (BasicSR's convention)."""
import importlib
import pkgutil


def import_modules(package_name, package_path, suffix):
    return [
        importlib.import_module(f'{package_name}.{name}') for _, name, _ in sorted(pkgutil.iter_modules(package_path))
        if name.endswith(suffix)
    ]
