from ._base import AbstractModel as AbstractModel
from ._cnn import CNN as CNN
from ._mlp import MLP as MLP
from ._rnn import ElmanCell as ElmanCell, RNN as RNN
