import t from 'tap';
import { ZtocError } from '../../ztoc/errors.js';

t.test('errors name their subject', async (t) => {
  const e = new ZtocError('layer.tar.gz', 'bad thing');
  t.equal(e.message, 'layer.tar.gz: bad thing');
  t.equal(e.subject, 'layer.tar.gz');
});
