from setuptools import find_packages, setup

setup(
    name='ciisr',
    version='0.1.0',
    description='Arbitrary-scale super-resolution (LIIF, A-LIIF, LIIF-GAN) as a BasicSR plugin',
    packages=find_packages(include=['ciisr_plugin', 'ciisr_plugin.*']),
    # the fused CPU kernels' C source, compiled at first use (ops/fused_cpu.py)
    package_data={'ciisr_plugin.ops': ['fused_cpu.c']},
    python_requires='>=3.9',
    # torch/torchvision ranges admit the locally cached 2.14.1 / 0.29.1 wheels.
    install_requires=[
        'torch>=2.0,<2.15',
        'torchvision>=0.15,<0.30',
        'basicsr==1.4.2',
        'lpips',
        'mmengine',
        'opencv-python',
        'pyyaml',
        'scikit-image',
        'tqdm',
        'matplotlib',
    ],
    extras_require={
        # the test suite covers ONNX export too, so it needs the onnx extra
        'test': ['pytest', 'onnx', 'onnxruntime', 'onnxscript'],
        'onnx': ['onnx', 'onnxruntime', 'onnxscript'],
    },
    entry_points={'console_scripts': ['basicsr=ciisr_plugin.cli:main']},
)
