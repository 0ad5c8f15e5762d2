"""A one-file Django app for anteroom-wsgi (tests/it/wsgi.rs)."""
import django
from django.conf import settings

settings.configure(DEBUG=False, SECRET_KEY="anteroom-test", ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"],
                   MIDDLEWARE=[])

from django.http import HttpResponse, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402


def hello(request):
    return HttpResponse(f"hello from django, {request.GET.get('name', 'world')}\n")


def echo(request):
    return JsonResponse({"framework": "django", "method": request.method, "path": request.path,
                         "body": request.body.decode(), "header": request.headers.get("X-Test")})


urlpatterns = [path("hello", hello), path("echo", echo)]
django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
