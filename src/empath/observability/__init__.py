from empath import use_native

use_native(__name__, __path__)
